"""The portal's parts as plain code: configuration, token rules, the upload cache, device slots, the CLI's refusal
to start exposed without a token (no model is loaded, no port bound)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from segmap.portal.auth import load_auth
from segmap.portal.config import AuthConfig, DatastoreConfig, PortalConfigError, load_config
from segmap.webauth import is_loopback
from segmap.portal.datastore import ImageNotFound, LocalDatastore, nifti_suffix
from segmap.portal.queue import ClientGone, QueueFull, Slot

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = "models:\n  spleen: {model: m.ts, task: t.yaml}\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "portal.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ configuration


def test_minimal_configuration_and_paths_relative_to_the_file(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.host == "127.0.0.1" and cfg.queue_length == 4 and cfg.max_upload_bytes == 1024 * 1024 * 1024
    [model] = cfg.models
    assert model.name == "spleen" and model.model == tmp_path / "m.ts" and model.task == tmp_path / "t.yaml"
    assert cfg.datastore.kind == "local" and cfg.auth.required == "auto"


@pytest.mark.parametrize("text, fragment", [
    ("portal: {auth: {token: abc}}\n" + MINIMAL, "portal.auth.token: the token is never written in the configuration"),
    ("portal: {queue_lenght: 3}\n" + MINIMAL, "unknown key(s) portal.queue_lenght"),
    ("portal: {queue_length: 0}\n" + MINIMAL, "portal.queue_length must be greater than 0"),
    ("portal: {port: http}\n" + MINIMAL, "portal.port must be int, got 'http'"),
    ("portal: {datastore: {kind: dicomweb}}\n" + MINIMAL, "portal.datastore.dicomweb_url is required"),
    ("portal: {datastore: {store_seg: true}}\n" + MINIMAL, "store_seg needs kind dicomweb"),
    ("portal: {datastore: {kind: s3}}\n" + MINIMAL, "portal.datastore.kind must be local or dicomweb"),
    ("portal: {}\nmodels: {}\n", "models is empty"),
    ("models:\n  spleen: {model: m.ts}\n", "models.spleen.task is required"),
    ("models:\n  'a b': {model: m.ts, task: t.yaml}\n", "model name 'a b' must be"),
    ("models:\n  s: {model: m.ts, task: t.yaml, settings: {output: /x}}\n", "models.s.settings.output is set by"),
    ("models: [", "not valid YAML"),
])
def test_configuration_mistakes_are_one_line_naming_the_key(tmp_path, text, fragment):
    with pytest.raises(PortalConfigError) as e:
        load_config(write(tmp_path, text))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_missing_configuration_file(tmp_path):
    with pytest.raises(PortalConfigError, match="cannot read the portal configuration"):
        load_config(tmp_path / "absent.yaml")


# ------------------------------------------------------------------------------------------------ token rules


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.3.0.1", True), ("::1", True),
                                             ("localhost", True), ("0.0.0.0", False), ("10.0.0.5", False),
                                             ("portal.example.org", False), ("::", False)])
def test_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_token_is_required_off_loopback_and_read_from_a_file_or_the_environment(tmp_path):
    with pytest.raises(PortalConfigError, match="binds 0.0.0.0 and needs a bearer token: set auth.token_file or "
                                                "the environment variable SEGMAP_PORTAL_TOKEN"):
        load_auth(AuthConfig(), "0.0.0.0", env={})
    assert not load_auth(AuthConfig(), "127.0.0.1", env={}).enabled
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-0123456789\n")
    auth = load_auth(AuthConfig(token_file=token_file), "0.0.0.0", env={})
    assert auth.accepts("Bearer s3cret-token-0123456789") and auth.accepts("bearer s3cret-token-0123456789")
    assert not auth.accepts("Bearer wrong") and not auth.accepts(None) and not auth.accepts("s3cret-token-0123456789")
    auth = load_auth(AuthConfig(token_env="MY_TOKEN"), "10.1.2.3", env={"MY_TOKEN": "from-the-env-0123456789"})
    assert auth.token == "from-the-env-0123456789"
    # A token that is given is used on loopback too; required: true asks for one there as well.
    assert load_auth(AuthConfig(), "127.0.0.1", env={"SEGMAP_PORTAL_TOKEN": "x" * 20}).enabled
    with pytest.raises(PortalConfigError, match="needs a bearer token"):
        load_auth(AuthConfig(required="true"), "127.0.0.1", env={})
    with pytest.raises(PortalConfigError, match="only allowed on a loopback address"):
        load_auth(AuthConfig(required="false"), "0.0.0.0", env={})
    with pytest.raises(PortalConfigError, match="shorter than 16 characters"):
        load_auth(AuthConfig(), "0.0.0.0", env={"SEGMAP_PORTAL_TOKEN": "short"})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(PortalConfigError, match="is empty"):
        load_auth(AuthConfig(token_file=empty), "0.0.0.0", env={})


def test_cli_refuses_to_start_exposed_without_a_token(tmp_path, capsys, monkeypatch):
    from segmap.cli import main

    monkeypatch.delenv("SEGMAP_PORTAL_TOKEN", raising=False)
    path = write(tmp_path, f"models:\n  spleen: {{model: {ROOT / 'models/demo-spleen/model.ts'}, "
                           f"task: {ROOT / 'tasks/spleen.yaml'}}}\n")
    pytest.importorskip("fastapi")
    assert main(["portal", "-c", str(path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("segmap: error: the portal binds 0.0.0.0 and needs a bearer token: set auth.token_file or "
                       "the environment variable SEGMAP_PORTAL_TOKEN"), err


def test_cli_example_is_a_valid_configuration(tmp_path, capsys):
    from segmap.cli import main

    assert main(["portal", "--example"]) == 0
    cfg = load_config(write(tmp_path, capsys.readouterr().out))
    assert [m.name for m in cfg.models] == ["spleen"] and cfg.models[0].settings == {"device": "cpu", "overlay": False}


# ------------------------------------------------------------------------------------------------ upload cache


def upload(tmp_path: Path, name: str, size: int = 1000) -> Path:
    path = tmp_path / f"upload-{name}"
    path.write_bytes(os.urandom(size))
    return path


def test_cache_keeps_uploads_bounded_by_count_size_and_age(tmp_path):
    store = LocalDatastore(DatastoreConfig(cache_dir=tmp_path / "cache", cache_max_images=3, cache_max_mb=1,
                                           cache_max_age_h=1))
    for i in range(4):
        assert store.add(upload(tmp_path, str(i)), f"ct{i}.nii.gz") == f"ct{i}"
        os.utime(store.root / f"ct{i}", (time.time() - 100 + i, time.time() - 100 + i))
    store.clean()
    assert sorted(store.listing("all")["objects"]) == ["ct1", "ct2", "ct3"]  # the least recently used went first
    with store.use("ct1"):
        pass  # using an image makes it the most recently used
    store.add(upload(tmp_path, "4"), "x.nii", image_id="ct4")
    assert sorted(store.listing("all")["objects"]) == ["ct1", "ct3", "ct4"]
    assert store.listing("stats")["total"] == 3

    store = LocalDatastore(DatastoreConfig(cache_dir=tmp_path / "cache2", cache_max_mb=1, cache_max_age_h=1))
    store.add(upload(tmp_path, "big", 700 * 1024), "big.nii.gz")
    os.utime(store.root / "big", (time.time() - 10, time.time() - 10))
    store.add(upload(tmp_path, "big2", 700 * 1024), "big2.nii.gz")
    assert list(store.listing("all")["objects"]) == ["big2"]  # 1.4 MB over 1 MB: the older one went
    os.utime(store.root / "big2", (time.time() - 7200, time.time() - 7200))
    assert store.clean() == ["big2"]  # older than an hour


def test_cache_never_removes_an_image_in_use(tmp_path):
    store = LocalDatastore(DatastoreConfig(cache_dir=tmp_path / "cache", cache_max_images=1))
    store.add(upload(tmp_path, "a"), "a.nii.gz")
    with store.use("a") as image:
        store.add(upload(tmp_path, "b"), "b.nii.gz")
        assert image.path.exists()  # "a" is over the count but pinned
        assert not store.remove("a")
    store.clean()
    assert not (store.root / "a").exists()
    with pytest.raises(ImageNotFound, match="image a is not in the portal's datastore"):
        with store.use("a"):
            pass


def test_upload_names_and_ids_are_checked(tmp_path):
    assert nifti_suffix("CT.NII.GZ") == ".nii.gz" and nifti_suffix("a.nii") == ".nii"
    store = LocalDatastore(DatastoreConfig(cache_dir=tmp_path / "cache"))
    from segmap.errors import InputError

    with pytest.raises(InputError, match="is not a NIfTI image"):
        store.add(upload(tmp_path, "x"), "slice.dcm")
    with pytest.raises(InputError, match="must be 1-128 letters"):
        store.add(upload(tmp_path, "y"), "a.nii.gz", image_id="../../etc")
    assert store.add(upload(tmp_path, "z"), "my scan (1).nii.gz") == "my_scan__1_"


# ------------------------------------------------------------------------------------------------ device slots


def test_slot_admits_its_capacity_runs_one_at_a_time_and_refuses_the_rest():
    async def scenario():
        slot = Slot("cpu", 2)
        first, second = slot.reserve(), slot.reserve()
        with pytest.raises(QueueFull) as full:
            slot.reserve()
        assert full.value.retry_after_s >= 1 and "queue full" in str(full.value)
        active, seen = [], []

        def work(tag):
            active.append(tag)
            seen.append(len(active))
            time.sleep(0.2)
            active.remove(tag)
            return tag

        async def never():
            return False

        with first, second:
            results = await asyncio.gather(first.run(lambda: work("a"), never), second.run(lambda: work("b"), never))
        assert results == ["a", "b"] and seen == [1, 1] and slot.admitted == 0
        assert second.wait_s >= 0.15  # it waited for the first
        slot.shutdown()

    asyncio.run(scenario())


def test_a_waiting_request_whose_client_leaves_never_runs():
    async def scenario():
        slot = Slot("cpu", 2)
        ran = []
        gone = asyncio.Event()

        async def disconnected():
            return gone.is_set()

        async def still_here():
            return False

        with slot.reserve() as first, slot.reserve() as second:
            running = asyncio.ensure_future(first.run(lambda: (time.sleep(0.6), ran.append("first")), still_here))
            waiting = asyncio.ensure_future(second.run(lambda: ran.append("second"), disconnected))
            await asyncio.sleep(0.2)
            gone.set()
            with pytest.raises(ClientGone):
                await waiting
            await running
        assert ran == ["first"] and slot.admitted == 0
        # The slot's lock is free again: a new request runs at once.
        with slot.reserve() as third:
            assert await third.run(lambda: "third", still_here) == "third"
        slot.shutdown()

    asyncio.run(scenario())
