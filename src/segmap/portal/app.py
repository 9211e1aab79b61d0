"""MONAI Label's REST API over warm segmap models (FastAPI).

Routes, as MONAI Label's clients (its Python client, 3D Slicer's extension, OHIF's mode, MONet-Bundle's
``MONet_remote_inference``) call them:

- ``GET /info/``: the models (labels and colours, dimension, description, MONet bundle metadata);
- ``POST /infer/{model}?image=ID[&session_id=S][&output=image|dicom_seg|json|all]``: form field ``params`` (JSON),
  optional ``file`` (a NIfTI upload); the answer is the label map (NIfTI), the DICOM SEG, the params JSON, or
  (``all``, the default) a multipart of ``params`` and the label map;
- ``GET /datastore/?output=stats|all|train``, ``PUT /datastore/?image=ID`` (also ``/datastore/image``), ``DELETE
  /datastore/?id=ID``; ``PUT /session/``, ``GET``/``DELETE /session/{id}`` (3D Slicer's upload of a local image);
- ``GET /auth/`` (whether a token is needed), ``POST /auth/token`` (the token as password), ``GET /auth/token/valid``;
- ``GET /metrics`` (Prometheus).

Every error is ``{"detail": "<one line>"}`` with a 4xx status (5xx for the portal's own faults), and nothing of a
DICOM header reaches the log unredacted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..errors import InputError, MemoryLimitError, SegmapError
from ..privacy import redact
from ..text import first_line, one_line
from .auth import Auth
from .config import PortalConfig
from .datastore import (DatastoreError, DicomwebDatastore, ImageNotFound, LocalDatastore, check_image_id,
                        nifti_suffix)
from .inference import DICOM_SEG, NIFTI, Result, WarmModel
from .metrics import Metrics
from .queue import ClientGone, QueueFull, Slot

log = logging.getLogger("segmap.portal")

#: ``output=`` values MONAI Label's clients send; ``all`` (multipart) when none is given.
OUTPUTS = ("image", "dicom_seg", "json", "all")
#: Paths answered without a token (a client asks them to learn that it needs one).
OPEN_PATHS = ("/auth", "/auth/", "/auth/token")


class PortalError(Exception):
    """A request the portal answers with ``status`` and one line (``headers``: e.g. Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class Portal:
    """Everything the routes share: configuration, token, models, slots, datastores, metrics."""

    config: PortalConfig
    auth: Auth
    models: dict[str, WarmModel]
    slots: dict[str, Slot]
    uploads: LocalDatastore
    dicomweb: DicomwebDatastore | None = None
    metrics: Metrics = field(default_factory=Metrics)

    def slot_of(self, model: WarmModel) -> Slot:
        return self.slots[model.device]

    @property
    def work_root(self) -> Path:
        root = Path(self.config.datastore.cache_dir) / "requests"
        root.mkdir(parents=True, exist_ok=True)
        return root


def make_slots(models: dict[str, WarmModel], queue_length: int) -> dict[str, Slot]:
    """One slot per device the models use (models on the same device share it)."""
    return {device: Slot(device, queue_length) for device in sorted({m.device for m in models.values()})}


# ------------------------------------------------------------------------------------------------ ASGI guards


class Guard:
    """The ASGI layer around the routes: the token check, the request body limit (413: by Content-Length at once,
    else while the body streams), and one log line and metric per request."""

    class TooLarge(Exception):
        pass

    def __init__(self, app, portal: "Portal") -> None:
        self.app, self.portal, self.limit = app, portal, portal.config.max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t = time.perf_counter()
        path = scope["path"]
        headers = dict(scope.get("headers") or [])
        sent = {"status": 0}
        received = 0

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            await send(message)

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise Guard.TooLarge()
            return message

        length = headers.get(b"content-length", b"")
        auth = self.portal.auth
        if auth.enabled and path not in OPEN_PATHS and \
                not auth.accepts(headers.get(b"authorization", b"").decode("latin-1")):
            await _error(401, "a bearer token is required (Authorization: Bearer <token>)",
                         {"WWW-Authenticate": "Bearer"})(scope, receive, tracking_send)
        elif length.isdigit() and int(length) > self.limit:
            await self.too_large()(scope, receive, tracking_send)
        else:
            try:
                await self.app(scope, limited_receive, tracking_send)
            except Guard.TooLarge:
                if not sent["status"]:
                    await self.too_large()(scope, receive, tracking_send)
        route = scope.get("route")
        self.portal.metrics.http.labels(getattr(route, "path", "unmatched"), str(sent["status"])).inc()
        if not path.startswith("/infer/"):  # inference requests log their own line with stage timings
            log.info("%s %s -> %d in %.3f s", scope["method"], path, sent["status"], time.perf_counter() - t)

    def too_large(self) -> JSONResponse:
        return _error(413, f"request body over the portal's limit of {self.limit / (1024 * 1024):g} MB "
                           f"(portal.max_upload_mb)", {"Connection": "close"})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------------ the application


def create_app(portal: Portal) -> Any:
    """The ASGI application: FastAPI routes inside :class:`Guard`."""
    app = FastAPI(title="segmap portal", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.portal = portal
    for slot in portal.slots.values():
        portal.metrics.track_slot(slot)

    @app.exception_handler(PortalError)
    async def portal_error(request: Request, e: PortalError):
        return _error(e.status, redact(e.message), e.headers)

    # --- authentication (MONAI Label's /auth routes) ---------------------------------------------------------

    @app.get("/auth/")
    async def auth_enabled():
        return {"enabled": portal.auth.enabled, "client_id": None, "realm": None}

    @app.post("/auth/token")
    async def auth_token(request: Request):
        form = await request.form(max_files=0, max_fields=8)
        if not portal.auth.password_matches(str(form.get("password") or "")):
            raise PortalError(401, "wrong token: give the portal's token as the password (any user name)")
        return {"access_token": portal.auth.token, "token_type": "bearer"}

    @app.get("/auth/token/valid")
    async def auth_valid():
        return {"username": "portal", "email": None, "name": "portal user", "roles": ["monailabel-user"]}

    # --- description -------------------------------------------------------------------------------------------

    @app.get("/info/")
    async def info():
        models = {name: m.info() for name, m in portal.models.items()}
        labels: list[str] = []
        for m in models.values():
            labels += [name for name in sorted(m["labels"], key=m["labels"].get) if name not in labels]
        return {"name": "segmap portal", "description": "segmap models, warm, behind MONAI Label's API",
                "version": __version__, "labels": labels, "models": models, "trainers": {}, "strategies": {},
                "scoring": {}, "train_stats": {}, "datastore": _datastore(portal).listing("stats")}

    @app.get("/metrics")
    async def metrics():
        body, content_type = portal.metrics.render()
        return Response(body, media_type=content_type)

    # --- datastore and sessions ---------------------------------------------------------------------------------

    @app.get("/datastore/")
    async def datastore(output: str = "stats"):
        store = _datastore(portal)
        return await asyncio.get_running_loop().run_in_executor(None, _listing, store, output)

    async def add_image(request: Request, image: str | None = None):
        form = await _form(request, portal)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise PortalError(400, "no image: send the NIfTI file as the multipart field 'file'")
        with _work_dir(portal) as work:
            path = await _save_upload(upload, work)
            try:
                image_id = portal.uploads.add(path, upload.filename or "image.nii.gz", image)
            except SegmapError as e:
                raise PortalError(_status_of(e), first_line(e)) from None
        return {"image": image_id}

    app.put("/datastore/")(add_image)
    app.put("/datastore/image")(add_image)

    @app.delete("/datastore/")
    @app.delete("/datastore/image")
    async def remove_image(id: str):
        _checked(id)
        if not portal.uploads.remove(id):
            raise PortalError(404, f"image {id} is not in the portal's upload cache (or is in use)")
        return {}

    @app.put("/session/")
    async def create_session(request: Request):
        form = await _form(request, portal)
        uploads = [f for _, f in form.multi_items() if not isinstance(f, str)]
        if len(uploads) != 1:
            raise PortalError(400, f"a session takes exactly one NIfTI file (multipart field 'files'), got "
                                   f"{len(uploads)}")
        with _work_dir(portal) as work:
            path = await _save_upload(uploads[0], work)
            session_id = f"session-{uuid.uuid4().hex}"
            try:
                portal.uploads.add(path, uploads[0].filename or "image.nii.gz", session_id)
            except SegmapError as e:
                raise PortalError(_status_of(e), first_line(e)) from None
        return {"session_id": session_id, "session_info": {"image": session_id}}

    @app.get("/session/{session_id}")
    async def get_session(session_id: str):
        _checked(session_id)
        try:
            with portal.uploads.use(session_id) as image:
                return {"session_id": session_id, "session_info": {"image": image.image_id}}
        except ImageNotFound as e:
            raise PortalError(404, first_line(e)) from None

    @app.delete("/session/{session_id}")
    async def remove_session(session_id: str):
        _checked(session_id)
        if not portal.uploads.remove(session_id):
            raise PortalError(404, f"session {session_id} does not exist (or is in use)")
        return {}

    # --- inference -----------------------------------------------------------------------------------------------

    @app.post("/infer/{model}")
    async def infer(request: Request, model: str):
        return await _infer(request, portal, model)

    return Guard(app, portal)


# ------------------------------------------------------------------------------------------------ inference


async def _infer(request: Request, portal: Portal, model_name: str) -> Response:
    request_id = uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    status = 500
    try:
        response = await _infer_steps(request, portal, model_name, request_id, timings)
        status = response.status_code
        return response
    except PortalError as e:
        status = e.status
        log.info("infer %s model=%s -> %d: %s", request_id, model_name, e.status, redact(e.message))
        raise
    except ClientGone:
        status = 499
        log.info("infer %s model=%s: the client disconnected while queued; request dropped", request_id, model_name)
        return Response(status_code=499)
    except Exception as e:  # a fault of the portal's own: one line to the client, the traceback in the log
        log.exception("infer %s model=%s: internal error", request_id, model_name)
        raise PortalError(500, f"internal error in request {request_id} ({type(e).__name__}); see the portal's "
                               f"log") from None
    finally:
        timings["total"] = time.perf_counter() - t0
        if model_name in portal.models:
            portal.metrics.observe(model_name, status, timings)
        if status < 400:
            log.info("infer %s model=%s -> %d: %s", request_id, model_name, status,
                     ", ".join(f"{k} {v:.3f} s" for k, v in timings.items()))


async def _infer_steps(request: Request, portal: Portal, model_name: str, request_id: str,
                       timings: dict[str, float]) -> Response:
    model = portal.models.get(model_name)
    if model is None:
        raise PortalError(404, f"unknown model '{model_name[:64]}' (models: {', '.join(portal.models)})")
    query = request.query_params
    output = query.get("output") or "all"  # the last one given (MONet's client sends two)
    if output not in OUTPUTS:
        raise PortalError(400, f"output={output[:32]!r} is not one of {', '.join(OUTPUTS)}")
    image_id, session_id = query.get("image") or "", query.get("session_id") or ""
    t = time.perf_counter()
    form = await _form(request, portal)
    params = _params(form.get("params"))
    upload = form.get("file")
    upload = None if isinstance(upload, str) else upload
    if upload is None and not image_id and not session_id:
        raise PortalError(400, "no image: give ?image=ID (datastore), ?session_id=ID, or the image as the "
                               "multipart field 'file'")

    slot = portal.slot_of(model)
    try:
        ticket = slot.reserve()
    except QueueFull as e:
        raise PortalError(503, str(e), {"Retry-After": str(e.retry_after_s)}) from None
    with ticket, _work_dir(portal) as work:
        loop = asyncio.get_running_loop()
        cached = None
        if upload is not None:
            source, kind = await _save_upload(upload, work / "input"), "nifti"
        elif session_id or (image_id and portal.uploads.has(_checked(image_id))):
            cached = portal.uploads.use(_checked(session_id or image_id))
            source, kind = _enter(cached).path, "nifti"
        elif portal.dicomweb is not None:
            source, kind = work / "dicom", "dicom"
            await loop.run_in_executor(None, _guarded, portal.dicomweb.fetch, image_id, source)
        else:
            raise PortalError(404, f"image {image_id} is not in the portal's datastore; upload it first "
                                   f"(PUT /datastore/?image=ID) or send it as the request's file")
        timings["fetch"] = time.perf_counter() - t
        try:
            if kind == "nifti" and output == "dicom_seg":
                raise PortalError(400, "output=dicom_seg needs a DICOM image: give a Series or Study Instance UID "
                                       "from the DICOMweb datastore (a NIfTI image gives output=image)")
            formats = [NIFTI] if kind == "nifti" else _dicom_formats(output, portal)

            def run() -> Result:
                if kind == "nifti":
                    return model.segment_nifti(source, work / "out")
                return model.segment_dicom(source, work / "out", formats)

            result = await ticket.run(lambda: _guarded(run), request.is_disconnected)
        finally:
            if cached is not None:
                cached.__exit__(None, None, None)
        timings["queue"] = ticket.wait_s
        timings.update(result.timings_s)
        stored = None
        if kind == "dicom" and portal.dicomweb is not None and portal.config.datastore.store_seg:
            t = time.perf_counter()
            await loop.run_in_executor(None, _guarded, portal.dicomweb.store, result.files[DICOM_SEG])
            stored = _seg_series_uid(result.files[DICOM_SEG])
            timings["store"] = time.perf_counter() - t
        answer = {"request_id": request_id, "model": model.name, "label_names": model.info()["labels"],
                  "segments": result.segments, "series": result.series, "stored_seg_series": stored,
                  "latencies": {k: round(v, 4) for k, v in timings.items()}}
        response = _respond(output, result, answer, request_id)
        # The stages in the standard Server-Timing header too (milliseconds), whatever the answer's form.
        response.headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in timings.items())
        return response


def _dicom_formats(output: str, portal: Portal) -> list[str]:
    formats = []
    if output in ("dicom_seg", "json") or portal.config.datastore.store_seg:
        formats.append(DICOM_SEG)
    if output in ("image", "all"):
        formats.append(NIFTI)
    return formats


def _respond(output: str, result: Result, answer: dict, request_id: str) -> Response:
    if output == "json":
        return JSONResponse(answer)
    if output == "dicom_seg":
        return Response(result.files[DICOM_SEG].read_bytes(), media_type="application/dicom",
                        headers={"Content-Disposition": f'attachment; filename="seg-{request_id}.dcm"'})
    label = result.files[NIFTI]
    name = f"label-{request_id}{''.join(label.suffixes)}"
    if output == "image":
        return Response(label.read_bytes(), media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})
    from urllib3 import encode_multipart_formdata
    from urllib3.fields import RequestField

    params = RequestField("params", json.dumps(answer))
    params.make_multipart(content_type="application/json")
    image = RequestField("image", label.read_bytes(), filename=name)
    image.make_multipart(content_type="application/octet-stream")
    body, content_type = encode_multipart_formdata([params, image])
    return Response(body, media_type=content_type)


def _seg_series_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


# ------------------------------------------------------------------------------------------------ helpers


def _status_of(e: SegmapError) -> int:
    if isinstance(e, ImageNotFound):
        return 404
    if isinstance(e, DatastoreError):
        return 502
    if isinstance(e, MemoryLimitError):
        return 507
    return 422


def _guarded(fn, *args):
    """Run a step; a user-actionable :class:`SegmapError` becomes a 4xx :class:`PortalError` with its line."""
    try:
        return fn(*args)
    except SegmapError as e:
        raise PortalError(_status_of(e), first_line(e)) from None


def _checked(image_id: str) -> str:
    try:
        return check_image_id(image_id)
    except InputError as e:
        raise PortalError(400, first_line(e)) from None


def _enter(context):
    try:
        return context.__enter__()
    except SegmapError as e:
        raise PortalError(_status_of(e), first_line(e)) from None


def _datastore(portal: Portal):
    return portal.dicomweb if portal.dicomweb is not None and portal.config.datastore.kind == "dicomweb" \
        else portal.uploads


def _listing(store, output: str) -> dict:
    return _guarded(store.listing, output)


def _params(value: Any) -> dict:
    if value is None or value == "":
        return {}
    if not isinstance(value, str):
        raise PortalError(400, "params must be a form field holding a JSON object, not a file")
    try:
        params = json.loads(value)
    except json.JSONDecodeError as e:
        raise PortalError(400, f"params is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(params, dict):
        raise PortalError(400, f"params must be a JSON object, got {type(params).__name__}")
    extension = params.get("result_extension")
    if extension not in (None, "", ".nii.gz", ".nii"):
        raise PortalError(400, f"result_extension {one_line(extension, 20)!r} is not supported: the portal returns "
                               f"NIfTI label maps (.nii.gz) and DICOM SEG (output=dicom_seg)")
    return params


async def _form(request: Request, portal: Portal):
    try:
        return await request.form(max_files=4, max_fields=16, max_part_size=1024 * 1024)
    except Guard.TooLarge:
        raise PortalError(413, f"request body over the portal's limit of {portal.config.max_upload_mb:g} MB "
                               f"(portal.max_upload_mb)") from None
    except Exception as e:  # starlette's MultiPartException and malformed bodies
        raise PortalError(400, f"malformed form data ({first_line(e)})") from None


async def _save_upload(upload, folder: Path) -> Path:
    """Write an uploaded file into ``folder`` under a safe name keeping its NIfTI suffix."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        suffix = nifti_suffix(upload.filename or "")
    except InputError as e:
        raise PortalError(415, first_line(e)) from None
    path = folder / f"image{suffix}"
    with path.open("wb") as out:
        while chunk := await upload.read(1024 * 1024):
            out.write(chunk)
    return path


class _work_dir:
    """A per-request folder under the cache, removed afterwards whatever happened."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="req-", dir=self.portal.work_root))
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
