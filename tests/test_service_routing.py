"""Routing: a series is a job for each MAP whose task rules (and trigger) select it; never for our own output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from segmap.demo.phantom import write_phantom_study
from segmap.dicom.loading import scan_dicom_folder
from segmap.service.config import MapConfig, Trigger
from segmap.service.routing import route
from segmap.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "tasks" / "spleen.yaml"


def maps(**trigger):
    return [MapConfig("spleen", "img", TASK, trigger=Trigger(**trigger) if trigger else None)]


TASKS = {"spleen": load_task(TASK)}


def never_ours(uid: str) -> bool:
    return False


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return write_phantom_study(tmp_path_factory.mktemp("ct"), shape_zyx=(6, 32, 32))


def test_a_ct_series_matches_the_ct_task(ct):
    (r,) = route(scan_dicom_folder(ct["dicom_dir"]), maps(), TASKS, never_ours)
    assert r.matched and "CT Series" in r.reason


def test_an_mr_series_does_not_match_and_says_why(tmp_path):
    mr = write_phantom_study(tmp_path, shape_zyx=(6, 32, 32), modality="MR")
    (r,) = route(scan_dicom_folder(mr["dicom_dir"]), maps(), TASKS, never_ours)
    assert not r.matched and "task rules do not select it" in r.reason and "Modality" in r.reason


def _copy_with(ct, folder: Path, **attributes) -> Path:
    """The phantom series copied into ``folder`` with ``attributes`` set on every instance."""
    folder.mkdir()
    for p in ct["dicom_files"]:
        ds = pydicom.dcmread(p)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(folder / p.name)
    return folder


def test_trigger_tag_must_contain_the_text(ct, tmp_path):
    (r,) = route(scan_dicom_folder(ct["dicom_dir"]), maps(tag="ImageComments", contains="AI:spleen"), TASKS,
                 never_ours)
    assert not r.matched and "ImageComments" in r.reason
    folder = _copy_with(ct, tmp_path / "tagged", ImageComments="please run ai:SPLEEN")
    (r,) = route(scan_dicom_folder(folder), maps(tag="ImageComments", contains="AI:spleen"), TASKS, never_ours)
    assert r.matched


def _seg_of(ct, folder: Path) -> Path:
    from segmap.outputs.seg import write_seg
    from segmap.tasks import load_task

    datasets = [pydicom.dcmread(p) for p in ct["dicom_files"]]
    labels = (ct["phantom"].labels > 0).astype(np.uint8)
    return write_seg(labels, datasets, load_task(TASK).segments, folder / "seg.dcm")


def test_our_seg_is_never_a_trigger(ct, tmp_path):
    folder = tmp_path / "seg"
    folder.mkdir()
    _seg_of(ct, folder)
    (r,) = route(scan_dicom_folder(folder), maps(), TASKS, never_ours)
    assert not r.matched and "SEG" in r.reason


def test_an_image_series_we_made_is_never_a_trigger(ct, tmp_path):
    folder = _copy_with(ct, tmp_path / "ours", Manufacturer="segmap")
    (r,) = route(scan_dicom_folder(folder), maps(), TASKS, never_ours)
    assert not r.matched and "made by segmap" in r.reason
    (r,) = route(scan_dicom_folder(ct["dicom_dir"]), maps(), TASKS, lambda uid: uid == ct["series_uid"])
    assert not r.matched and "output of one of our jobs" in r.reason


def test_serve_loads_every_task_once_and_names_the_map_of_a_broken_one(tmp_path):
    from segmap.errors import ServiceConfigError
    from segmap.service.routing import load_routable_tasks

    assert list(load_routable_tasks(maps())) == ["spleen"]
    (tmp_path / "bad.yaml").write_text("tasks: {}\n")
    with pytest.raises(ServiceConfigError, match=r"maps\[1\] \(broken\)"):
        load_routable_tasks([*maps(), MapConfig("broken", "img", tmp_path / "bad.yaml")])
