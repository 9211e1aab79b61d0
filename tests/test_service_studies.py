"""Study-level jobs of a multi-modality MAP, on the real store (SQLite), selection code and loop; only the container
runner is a recording double (the e2e tests run real MAP images).

A study is two MR series (T1, T2) of one patient and frame of reference; instances are recorded as the listener
records them, and the service loop is ticked with explicit clocks.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from segmap.demo.phantom import make_phantom, write_dicom_series
from segmap.dicom.loading import scan_dicom_folder
from segmap.service.config import MapConfig, parse_config
from segmap.service.routing import route
from segmap.service.runners.base import RunStatus
from segmap.service.service import Service
from segmap.service.store import Arrival
from segmap.service.studies import COMPLETE, FAILED, NONE, WAITING, StudyBook, decide, study_job_key, study_lines
from segmap.tasks import load_task

pytestmark = pytest.mark.unit

RULES = '{"selections": [{"name": "%s", "conditions": {"Modality": "(?i)MR", "SeriesDescription": "(?i)%s"}}]}'
SEGMENT = {"segmented_property_category": {"code": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"},
           "segmented_property_type": {"code": "78961009", "scheme": "SCT", "meaning": "Spleen"},
           "algorithm_name": "test", "segment_label": "Bright"}
DIGEST = "sha256:" + "ab" * 32
QUIET = 5.0
GIVE_UP = 1000.0


def write_task(folder: Path) -> Path:
    task = {"tasks": {"TwoMR": {
        "Modalities": {"T1": {"File_Pattern": "_t1.nii.gz", "Rules_Text": RULES % ("T1", "t1")},
                       "T2": {"File_Pattern": "_t2.nii.gz", "Rules_Text": RULES % ("T2", "t2")}},
        "Reference_Modality": "T1", "Segments": [SEGMENT]}}}
    path = folder / "task.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


def write_study(folder: Path, *, patient: str = "P1", series=(("T1 axial", 1, 6), ("T2 axial", 2, 6)),
                like: dict | None = None) -> dict:
    """One study's series: description, number, slices -> {description: (series UID, files)}; ``like``: more
    series of that study (same study UID and frame of reference)."""
    study, forum = (like["study_uid"], like["forum"]) if like else (generate_uid(), generate_uid())
    out = {"study_uid": study, "forum": forum}
    for description, number, slices in series:
        ph = make_phantom((slices, 16, 16), (4.0, 3.0, 3.0), seed=number)
        files = write_dicom_series(ph, folder / f"{description.replace(' ', '_')}-{number}", modality="MR",
                                   series_description=description, study_uid=study, series_number=number,
                                   frame_of_reference_uid=forum, patient_id=patient)
        out[description] = (str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID), files)
    return out


def arrivals(study: dict, description: str) -> list[Arrival]:
    series_uid, files = study[description]
    return [Arrival("listener", study["study_uid"], series_uid,
                    str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), "MR", path=str(f))
            for f in files]


class RecordingRunner:
    """The runner interface, recording what it was asked to run; a run stays ``running`` (never finishes)."""

    kind, runs_digest, local = "recording", True, True

    def __init__(self):
        self.started: dict[str, list[str]] = {}

    def image_digest(self, image: str) -> str:
        return DIGEST

    def start(self, spec):
        self.started[spec.name] = sorted(p.name for p in Path(spec.input_dir).rglob("*.dcm"))
        return RunStatus("running")

    def status(self, name: str) -> RunStatus:
        return RunStatus("running") if name in self.started else RunStatus("missing")

    def adopt(self, name: str) -> RunStatus:
        return self.status(name)

    def logs(self, name: str, tail: int = 200) -> str:
        return ""

    def cancel(self, name: str) -> None:
        pass

    def remove(self, name: str) -> None:
        pass


@pytest.fixture
def setup(tmp_path):
    task = write_task(tmp_path)
    doc = {"service": {"workdir": str(tmp_path / "work"), "quiet_period_s": QUIET, "study_give_up_s": GIVE_UP,
                       "worker": "w1"},
           "listener": {"port": 11112}, "runner": {"max_concurrent": 4},
           "maps": [{"name": "twomr", "image": "example/twomr:1", "task": str(task)}]}
    config = parse_config(doc, tmp_path / "segmap.yaml")
    runner = RecordingRunner()

    def start():  # a fresh process: knows nothing but the store and the workdir
        return Service(config, runner=runner, destinations={})

    return start, runner, tmp_path


def record(svc: Service, items, now: float) -> None:
    for a in items:
        svc.store.record_instance(a, now=now)


def jobs_of(svc: Service, study_uid: str):
    return [j for j in svc.store.list_jobs() if j.study_uid == study_uid]


# ------------------------------------------------------------------------------------------------ the key


def test_the_study_key_names_every_choice_and_nothing_else():
    chosen = {"T1": ("1.1", ["1.1.1", "1.1.2"]), "T2": ("1.2", ["1.2.1"])}
    key = study_job_key("9", chosen, "twomr", ["pacs"], DIGEST)
    assert key == study_job_key("9", {"T2": ("1.2", ["1.2.1"]), "T1": ("1.1", ["1.1.2", "1.1.1"])}, "twomr",
                                ["pacs"], DIGEST)
    others = [study_job_key("8", chosen, "twomr", ["pacs"], DIGEST),
              study_job_key("9", {**chosen, "T2": ("1.3", ["1.2.1"])}, "twomr", ["pacs"], DIGEST),
              study_job_key("9", {**chosen, "T2": ("1.2", ["1.2.1", "1.2.2"])}, "twomr", ["pacs"], DIGEST),
              study_job_key("9", chosen, "other", ["pacs"], DIGEST),
              study_job_key("9", chosen, "twomr", ["pacs", "archive"], DIGEST),
              study_job_key("9", chosen, "twomr", ["pacs"], "sha256:" + "cd" * 32)]
    assert len({key, *others}) == 7
    with pytest.raises(ValueError):
        study_job_key("9", {"T1": ("1.1", [])}, "twomr", [], DIGEST)


# ------------------------------------------------------------------------------------------------ the decision


def test_decide_fills_each_modality_and_explains_what_was_passed_over(tmp_path):
    study = write_study(tmp_path, series=(("T1 axial", 1, 6), ("T2 axial", 2, 6), ("T2 scout", 3, 3)))

    task = load_task(write_task(tmp_path))
    d = decide(scan_dicom_folder(tmp_path), task, MapConfig("twomr", "img", tmp_path / "task.yaml"))
    assert d.state == COMPLETE and list(d.chosen) == ["T1", "T2"]
    assert d.chosen["T2"].series.series_instance_uid == study["T2 axial"][0]
    assert f"T1 <- {study['T1 axial'][0]}" in d.text and f"T2 <- {study['T2 axial'][0]}" in d.text
    scout = study["T2 scout"][0]
    assert f"passed over for T2: {scout}" in d.text and "matched 'T2' too" in d.text, d.text
    assert f"passed over for T1: {study['T2 axial'][0]}" in d.text and "chosen for modality 'T2'" in d.text


def test_decide_names_the_missing_modality_and_ignores_studies_for_no_modality(tmp_path):

    task = load_task(write_task(tmp_path))
    m = MapConfig("twomr", "img", tmp_path / "task.yaml")
    write_study(tmp_path / "a", series=(("T1 axial", 1, 6),))
    d = decide(scan_dicom_folder(tmp_path / "a"), task, m)
    assert d.state == WAITING and "modality 'T2'" in d.lacking and "T1" not in d.lacking.split(":")[0]
    write_study(tmp_path / "b", series=(("DWI", 1, 6),))
    assert decide(scan_dicom_folder(tmp_path / "b"), task, m).state == NONE


def test_a_series_is_never_a_job_of_a_study_map_and_says_which_modality_it_may_fill(tmp_path):

    task = load_task(write_task(tmp_path))
    study = write_study(tmp_path, series=(("T2 axial", 2, 6),))
    (r,) = route(scan_dicom_folder(study["T2 axial"][1][0].parent), [MapConfig("twomr", "img", task.source)],
                 {"twomr": task}, lambda uid: False)
    assert not r.matched and "study-level MAP" in r.reason and "'T2'" in r.reason and "'T1'" not in r.reason


# ------------------------------------------------------------------------------------------------ the loop


def test_interleaved_studies_half_received_across_restarts_give_one_job_each(setup):
    start, runner, tmp = setup
    a, b = write_study(tmp / "a", patient="PA"), write_study(tmp / "b", patient="PB")
    rng = random.Random(7)
    first = arrivals(a, "T2 axial") + arrivals(b, "T1 axial")  # one series of each study, instances interleaved
    second = arrivals(b, "T2 axial") + arrivals(a, "T1 axial")
    rng.shuffle(first)
    rng.shuffle(second)
    svc = start()
    record(svc, first, now=100)
    svc.tick(now=100 + QUIET)  # those series closed, no study complete: no job, and no partial job
    assert svc.store.list_jobs() == []
    assert {s.state for s in StudyBook(svc.store).studies()} == {WAITING}
    svc = start()  # kill -9 while the studies are half received
    record(svc, second, now=200)
    svc.tick(now=200 + QUIET - 1)
    assert svc.store.list_jobs() == [], "a study is looked at only once it has been quiet"
    svc.tick(now=200 + QUIET)
    assert len(runner.started) == 2
    svc = start()  # kill -9 while the jobs run: adopted, not repeated
    svc.tick(now=200 + QUIET + 1)
    svc.tick(now=200 + QUIET + 2)
    for study in (a, b):
        (job,) = jobs_of(svc, study["study_uid"])
        assert job.state == "running"
        want = sorted(f"{x.sop_uid}.dcm" for d in ("T1 axial", "T2 axial") for x in arrivals(study, d))
        assert runner.started[job.run_name] == want, "the job's input is exactly the chosen series"
        s = StudyBook(svc.store).get(study["study_uid"], "twomr")
        assert s.state == COMPLETE and s.job_key == job.key
        assert study["T1 axial"][0] in s.decision and study["T2 axial"][0] in s.decision
    assert len(runner.started) == 2


def test_an_unchanged_resend_makes_no_job_and_a_changed_choice_makes_one(setup):
    start, runner, tmp = setup
    a = write_study(tmp / "a", series=(("T1 axial", 1, 6), ("T2 axial", 2, 6)))
    svc = start()
    record(svc, arrivals(a, "T1 axial") + arrivals(a, "T2 axial"), now=100)
    svc.tick(now=200)
    (first,) = jobs_of(svc, a["study_uid"])

    record(svc, arrivals(a, "T1 axial") + arrivals(a, "T2 axial"), now=300)  # the whole study sent again
    svc.tick(now=400)
    assert [j.key for j in jobs_of(svc, a["study_uid"])] == [first.key]

    extra = write_study(tmp / "x", series=(("T2 scout", 7, 3),), like=a)  # one more series that changes no choice
    record(svc, arrivals(extra, "T2 scout"), now=500)
    svc.tick(now=600)
    assert [j.key for j in jobs_of(svc, a["study_uid"])] == [first.key]
    assert "unchanged" in StudyBook(svc.store).get(a["study_uid"], "twomr").decision

    newer = write_study(tmp / "n", series=(("T2 axial", 9, 8),), like=a)  # a replaced T2 (the ranking prefers it)
    record(svc, arrivals(newer, "T2 axial"), now=700)
    svc.tick(now=800)
    jobs = jobs_of(svc, a["study_uid"])
    assert len(jobs) == 2
    assert len(runner.started[jobs[0].run_name]) == 6 + 8, "the new job runs on T1 and the new T2"


def test_a_study_lacking_a_modality_waits_then_fails_naming_it(setup):
    start, runner, tmp = setup
    a = write_study(tmp / "a", series=(("T1 axial", 1, 6),))
    svc = start()
    record(svc, arrivals(a, "T1 axial"), now=100)
    svc.tick(now=200)
    assert svc.store.list_jobs() == []
    s = StudyBook(svc.store).get(a["study_uid"], "twomr")
    assert s.state == WAITING and "modality 'T2'" in s.lacking
    assert any(a["study_uid"] in line and "waiting" in line and "'T2'" in line for line in study_lines(svc.store))
    svc.tick(now=200 + GIVE_UP)
    s = StudyBook(svc.store).get(a["study_uid"], "twomr")
    assert s.state == FAILED and "modality 'T2'" in s.decision and s.decision.startswith("failed: incomplete")
    assert svc.store.list_jobs() == [], "no partial job"


def test_serve_check_accepts_a_multi_modality_map_and_runs_the_routing_checks(tmp_path):
    task = write_task(tmp_path)
    doc = {"service": {"workdir": str(tmp_path / "work")}, "listener": {"port": 11112},
           "maps": [{"name": "twomr", "image": "example/twomr:1", "task": str(task)}]}
    cfg = tmp_path / "segmap.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    done = subprocess.run([sys.executable, "-m", "segmap.cli", "serve", "-c", str(cfg), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("OK"), done.stderr


def test_submit_counts_the_jobs_a_study_makes_with_the_services_routing(tmp_path):
    from segmap.submit.client import expected_results

    task = write_task(tmp_path)
    doc = {"service": {"workdir": str(tmp_path / "work")}, "listener": {"port": 11112},
           "maps": [{"name": "twomr", "image": "example/twomr:1", "task": str(task)},
                    {"name": "spleen", "image": "example/spleen:1",
                     "task": str(Path(__file__).resolve().parents[1] / "tasks" / "spleen.yaml")}]}
    cfg = tmp_path / "segmap.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    write_study(tmp_path / "full")
    assert expected_results(cfg, tmp_path / "full") == {"twomr": 1}
    write_study(tmp_path / "half", series=(("T1 axial", 1, 6),))
    assert expected_results(cfg, tmp_path / "half") == {}
