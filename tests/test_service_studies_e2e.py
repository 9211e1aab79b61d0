"""Study-level jobs end to end, with real parts on loopback: the MAP image of a two-modality (T1 + T2 MR) phantom
model built here by `segmap package`, the Docker engine running it, DCMTK's storescu/storescp, `segmap serve` as its
own process (killed with SIGKILL while a study is half received and while its job runs).
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from conftest import record_figure
from pacs import StoreSCP, free_port, storescu, wait_for
from service_harness import ServiceProcess
from segmap.demo.phantom import make_phantom, write_dicom_series
from segmap.service.keys import seg_uids

pytest.importorskip("dynamic_network_architectures")

TAG = "segmap-test/twomr:ci"
RULES = '{"selections": [{"name": "%s", "conditions": {"Modality": "(?i)MR", "SeriesDescription": "(?i)%s"}}]}'
SEGMENT = {"segmented_property_category": {"code": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"},
           "segmented_property_type": {"code": "78961009", "scheme": "SCT", "meaning": "Spleen"},
           "algorithm_name": "test"}


@pytest.fixture(scope="module")
def twomr(engine, tmp_path_factory):
    """(MAP image tag, task file) of a two-modality phantom model, packaged once for this module."""
    import torch
    from segmap_tools.plans import build_network, make_dataset_json, make_plans

    from segmap.model import default_metadata, export_monet

    root = tmp_path_factory.mktemp("twomr")
    torch.manual_seed(3)
    ds = make_dataset_json({"background": 0, "bright": 1}, channel_names=["T1", "T2"])
    plans = make_plans(patch_size=(16, 32, 32), spacing=(4.0, 3.0, 3.0), features=(4, 8, 16),
                       normalization_schemes=["ZScoreNormalization", "ZScoreNormalization"])
    net = build_network(plans, "3d_fullres", 2, 2)
    export_monet(root / "model.ts", net, plans, ds, "3d_fullres", metadata=default_metadata(ds, input_names=["T1", "T2"]))
    task = {"tasks": {"TwoMR": {
        "Modalities": {"T1": {"File_Pattern": "_t1.nii.gz", "Rules_Text": RULES % ("T1", "t1")},
                       "T2": {"File_Pattern": "_t2.nii.gz", "Rules_Text": RULES % ("T2", "t2")}},
        "Reference_Modality": "T1", "Segments": [dict(SEGMENT, segment_label="Bright")]}}}
    (root / "task.yaml").write_text(yaml.safe_dump(task))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "segmap.cli", "package", "--model", str(root / "model.ts"), "--task",
                           str(root / "task.yaml"), "--tag", TAG, "--variants", "dicom", "--cpu"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record_figure(f"segmap package of the two-modality phantom model took {time.perf_counter() - t:.0f} s")
    return TAG, root / "task.yaml"


def write_study(folder: Path, seed: int, series=(("T1 axial", 1, 12), ("T2 axial", 2, 10)), like=None) -> dict:
    """An MR study: {description: (series UID, files)} of one patient and frame of reference; ``like`` adds series
    to that study."""
    study, forum = (like["study_uid"], like["forum"]) if like else (generate_uid(), generate_uid())
    out = {"study_uid": study, "forum": forum}
    for description, number, slices in series:
        ph = make_phantom((slices, 40, 40), (4.0, 3.0, 3.0), seed=seed)
        ph.hu[:] = np.clip(ph.hu + 1024, 0, None)
        files = write_dicom_series(ph, folder / f"{number}", modality="MR", series_description=description,
                                   study_uid=study, series_number=number, frame_of_reference_uid=forum,
                                   patient_id=f"P{seed}")
        out[description] = (str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID), files)
    return out


def service(folder: Path, image: str, task: Path, **service_settings) -> ServiceProcess:
    """A `segmap serve` process whose one MAP is the two-modality one (the harness's config, its MAP replaced)."""
    scp_port = service_settings.pop("scp_port", None)
    dest = {"pacs": {"kind": "dicom", "host": "127.0.0.1", "port": scp_port, "ae_title": "STORESCP"}} \
        if scp_port else {}
    svc = ServiceProcess(folder, image, quiet_period_s=3, destinations=dest, extra={"service": service_settings})
    doc = yaml.safe_load(svc.config_path.read_text())
    doc["maps"] = [{"name": "twomr", "image": image, "task": str(task), "destinations": list(dest)}]
    svc.config_path.write_text(yaml.safe_dump(doc))
    return svc


def interleaved(*file_lists, seed: int = 0) -> list[Path]:
    files = [f for fl in file_lists for f in fl]
    random.Random(seed).shuffle(files)
    return files


def study_containers() -> list:
    import docker
    return docker.from_env().containers.list(all=True, filters={"label": "segmap.map=twomr"})


def test_interleaved_studies_through_kill9_give_one_seg_each_and_only_a_changed_choice_runs_again(twomr, tmp_path):
    image, task = twomr
    scp = StoreSCP(tmp_path / "storescp-in", free_port()).start()
    svc = service(tmp_path / "svc", image, task, scp_port=scp.port).start()
    try:
        a, b = write_study(tmp_path / "a", seed=1), write_study(tmp_path / "b", seed=2)
        # Half of each study (one series of each, instances interleaved), then kill -9 inside the quiet period.
        storescu(interleaved(a["T2 axial"][1], b["T1 axial"][1], seed=1), svc.port, "SEGMAP")
        svc.restart_after_kill9()
        time.sleep(5)  # the half-received series close: still no job, never a partial one
        assert svc.jobs() == [], "no job from half a study"
        storescu(interleaved(a["T1 axial"][1], b["T2 axial"][1], seed=2), svc.port, "SEGMAP")
        wait_for(lambda: svc.jobs("running") and study_containers(), 120, "a study job running in its container")
        svc.restart_after_kill9()  # kill -9 while the job runs: the container is adopted, not started again
        jobs = svc.wait_jobs("done", 2, timeout=420)
        assert sorted(j.study_uid for j in jobs) == sorted([a["study_uid"], b["study_uid"]])
        assert all(j.attempts == 1 for j in jobs), [(j.key[:8], j.attempts) for j in jobs]
        assert all(j.instance_count == 22 for j in jobs)
        segs = [pydicom.dcmread(p) for p in scp.files()]
        assert len(segs) == 2
        for s in segs:
            study = a if str(s.StudyInstanceUID) == a["study_uid"] else b
            (job,) = [j for j in jobs if j.study_uid == study["study_uid"]]
            assert (str(s.SeriesInstanceUID), str(s.SOPInstanceUID)) == seg_uids(job.key)
            # every input series: T1 (the frames' source) and T2
            assert {str(r.SeriesInstanceUID) for r in s.ReferencedSeriesSequence} == {study["T1 axial"][0],
                                                                                      study["T2 axial"][0]}
        assert "adopted" in svc.log()

        # The whole of study a again, unchanged: no new job.
        storescu(a["T1 axial"][1] + a["T2 axial"][1], svc.port, "SEGMAP")
        time.sleep(8)  # past the quiet period: the instances are known already, nothing new to close or queue
        assert len(svc.jobs()) == 2

        # A replaced T2 (more slices: the rules' ranking prefers it): one new job, on T1 and the new T2.
        before = {j.key for j in svc.jobs()}
        newer = write_study(tmp_path / "a2", seed=1, series=(("T2 axial", 5, 14),), like=a)
        storescu(newer["T2 axial"][1], svc.port, "SEGMAP")
        jobs = svc.wait_jobs("done", 3, timeout=300)
        (new,) = [j for j in jobs if j.key not in before]
        assert new.study_uid == a["study_uid"] and new.instance_count == 12 + 14
        assert len(scp.files()) == 3
    finally:
        svc.stop()
        scp.stop()


def test_a_study_missing_a_modality_waits_then_fails_naming_it(twomr, tmp_path):
    image, task = twomr
    svc = service(tmp_path / "svc", image, task, study_give_up_s=8).start()
    try:
        c = write_study(tmp_path / "c", seed=3, series=(("T1 axial", 1, 12),))
        storescu(c["T1 axial"][1], svc.port, "SEGMAP")

        def jobs_listing() -> str:
            return subprocess.run([sys.executable, "-m", "segmap.cli", "jobs", "-c", str(svc.config_path)],
                                  capture_output=True, text=True, timeout=60).stdout

        wait_for(lambda: f"study {c['study_uid']} twomr waiting" in jobs_listing(), 60, "the study to wait")
        assert "modality 'T2'" in jobs_listing()
        wait_for(lambda: f"study {c['study_uid']} twomr failed" in jobs_listing(), 60, "the study to fail")
        assert "modality 'T2'" in jobs_listing().split(f"study {c['study_uid']} twomr failed")[1]
        assert svc.jobs() == [], "no partial job"
    finally:
        svc.stop()
