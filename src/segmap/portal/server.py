"""Start the portal: read the configuration, check the token rules, load and warm every model, serve with uvicorn.

Everything that can be wrong with the configuration, the token or a model fails here, before the port is bound, as
one line (``segmap: error: ...``).
"""

from __future__ import annotations

import logging
import time

from .app import Portal, create_app, make_slots
from .auth import load_auth
from .config import PortalConfig
from .datastore import DicomwebDatastore, LocalDatastore

log = logging.getLogger("segmap.portal")


def build_portal(config: PortalConfig) -> Portal:
    """The portal's shared state with every model loaded (and warmed up on its device's thread)."""
    from .inference import WarmModel

    auth = load_auth(config.auth, config.host)
    uploads = LocalDatastore(config.datastore)
    dicomweb = DicomwebDatastore(config.datastore) if config.datastore.kind == "dicomweb" else None
    models: dict[str, WarmModel] = {}
    for cfg in config.models:
        t = time.perf_counter()
        models[cfg.name] = WarmModel(cfg)
        log.info("model '%s' loaded in %.1f s (task '%s', device %s)", cfg.name, time.perf_counter() - t,
                 models[cfg.name].task.name, models[cfg.name].device)
    slots = make_slots(models, config.queue_length)
    if config.warm_up:
        for model in models.values():
            seconds = slots[model.device].run_blocking(model.warm_up)
            log.info("model '%s' warmed up in %.1f s", model.name, seconds)
    return Portal(config=config, auth=auth, models=models, slots=slots, uploads=uploads, dicomweb=dicomweb)


def serve(config: PortalConfig) -> None:
    """Run the portal until SIGTERM/SIGINT."""
    import uvicorn

    portal = build_portal(config)
    log.info("segmap portal on http://%s:%d/ (models: %s; datastore: %s; token %s; queue %d per device)",
             config.host, config.port, ", ".join(portal.models), config.datastore.kind,
             "required" if portal.auth.enabled else "off", config.queue_length)
    try:
        uvicorn.run(create_app(portal), host=config.host, port=config.port, access_log=False, log_config=None,
                    timeout_graceful_shutdown=30)
    finally:
        for slot in portal.slots.values():
            slot.shutdown()
