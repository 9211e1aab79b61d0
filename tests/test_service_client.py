"""``segmap submit`` against a real Orthanc that is both the target and the query node.

A background thread plays the job service: it waits until the sent series is complete in Orthanc, writes a real
DICOM SEG for it with segmap's writer and uploads it. The client must find that SEG (over REST, or by C-FIND +
C-GET), and only a SEG that really belongs to what was sent.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
import pytest

from pacs import Orthanc, free_port
from segmap.demo.phantom import write_phantom_study
from segmap.errors import SegmapError, SubmitError
from segmap.outputs.seg import write_seg
from segmap.submit.client import parse_node, scan_study, submit
from segmap.tasks import Code, Segment

SUBMIT_AE = "SEGMAP-SUBMIT"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
SPLEEN = Segment("Spleen", Code("91772007", "SCT", "Organ"), Code("78961009", "SCT", "Spleen"), "segmap-test")
NAME, PATIENT_ID = "Sensitive^Person", "PID-998877"


def phantom(folder: Path, modality: str = "CT", seed: int = 3, **kw) -> dict:
    return write_phantom_study(folder, seed=seed, shape_zyx=(8, 32, 32), spacing_zyx=(3.0, 3.0, 3.0),
                               modality=modality, patient_name=NAME, patient_id=PATIENT_ID, **kw)


def make_seg(study: dict, out: Path, n: int | None = None) -> Path:
    """A real SEG of the phantom's spleen label over its first ``n`` slices (all by default)."""
    files = study["dicom_files"][:n]
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return write_seg(study["phantom"].labels[:len(files)], sources, [SPLEEN], out)


class PlayService(threading.Thread):
    """Waits until the study's whole series is in Orthanc, then uploads a SEG of it (what the service does)."""

    def __init__(self, orthanc: Orthanc, study: dict, workdir: Path, delay: float = 0.5):
        super().__init__(daemon=True)
        self.orthanc, self.study, self.workdir, self.delay = orthanc, study, workdir, delay
        self.error: BaseException | None = None
        self.seg_uid: str | None = None

    def run(self) -> None:
        try:
            expected = len(self.study["dicom_files"])
            deadline = time.monotonic() + 60
            while self.orthanc.series_instance_count(self.study["series_uid"]) < expected:
                if time.monotonic() > deadline:
                    raise TimeoutError("the series never arrived in Orthanc")
                time.sleep(0.2)
            time.sleep(self.delay)  # the client is polling meanwhile and must not take anything else
            path = make_seg(self.study, self.workdir / "made-seg.dcm")
            self.seg_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            self.orthanc.upload(path)
        except BaseException as e:  # reported by the test, not lost in the thread
            self.error = e


def referenced_series(path: Path) -> list[str]:
    return [str(item.SeriesInstanceUID) for item in pydicom.dcmread(path).ReferencedSeriesSequence]


@pytest.fixture
def orthanc_qr(tmp_path):
    """An Orthanc that knows the client's AE title, so it answers its C-FIND and C-GET."""
    server = Orthanc(tmp_path / "orthanc", free_port(), free_port(),
                     modalities={"submit": [SUBMIT_AE, "127.0.0.1", free_port()]}).start()
    yield server
    server.stop()


def run_submit(orthanc: Orthanc, study: dict, query: str, tmp_path: Path, **kw) -> tuple[list[Path], list[str]]:
    lines: list[str] = []
    paths = submit(study["dicom_dir"], f"127.0.0.1:{orthanc.dicom_port}/{orthanc.aet}", calling_ae=SUBMIT_AE,
                   query=query, out_dir=tmp_path / "result", timeout_s=kw.pop("timeout_s", 60), poll_s=0.3,
                   progress=lines.append, **kw)
    return paths, lines


def test_submit_ct_finds_the_seg_over_rest_and_ignores_an_older_seg(orthanc, tmp_path):
    study = phantom(tmp_path / "ct")
    # An earlier SEG of the same series made from fewer instances is at the node already: not the answer now.
    orthanc.upload(make_seg(study, tmp_path / "old-seg.dcm", n=6))
    service = PlayService(orthanc, study, tmp_path)
    service.start()
    paths, lines = run_submit(orthanc, study, f"orthanc+{orthanc.url}", tmp_path)
    service.join(30)
    assert service.error is None, service.error
    assert len(paths) == 1 and paths[0].parent == tmp_path / "result"
    seg = pydicom.dcmread(paths[0])
    assert seg.Modality == "SEG" and str(seg.SOPInstanceUID) == service.seg_uid
    assert referenced_series(paths[0]) == [study["series_uid"]]
    assert "sent 8/8" in lines and any(line.startswith("found SEG") for line in lines)
    assert not any(NAME.split("^")[0] in line or PATIENT_ID in line for line in lines)
    assert orthanc.series_instance_count(study["series_uid"]) == 8

    # Sent again unchanged: the service makes no new job; the SEG already there references exactly what was sent.
    again, _ = run_submit(orthanc, study, f"orthanc+{orthanc.url}", tmp_path / "again", timeout_s=10)
    assert [str(pydicom.dcmread(p).SOPInstanceUID) for p in again] == [service.seg_uid]


def test_submit_mr_finds_the_seg_by_cfind_and_cget(orthanc_qr, tmp_path):
    study = phantom(tmp_path / "mr", modality="MR", seed=5)
    service = PlayService(orthanc_qr, study, tmp_path)
    service.start()
    paths, lines = run_submit(orthanc_qr, study, f"dicom://127.0.0.1:{orthanc_qr.dicom_port}/{orthanc_qr.aet}",
                              tmp_path)
    service.join(30)
    assert service.error is None, service.error
    assert [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths] == [service.seg_uid]
    assert referenced_series(paths[0]) == [study["series_uid"]]
    assert any(line.startswith("study ") and "MR " in line for line in lines)


def test_submit_dicom_query_refused_by_a_node_that_does_not_know_us(orthanc, tmp_path):
    study = phantom(tmp_path / "ct")
    with pytest.raises(SubmitError) as e:
        run_submit(orthanc, study, f"dicom://127.0.0.1:{orthanc.dicom_port}/{orthanc.aet}", tmp_path, timeout_s=5)
    message = str(e.value)
    assert "\n" not in message and f"dicom://127.0.0.1:{orthanc.dicom_port}" in message and SUBMIT_AE in message


def test_submit_times_out_with_one_line_when_no_seg_comes(orthanc, tmp_path):
    study = phantom(tmp_path / "ct")
    started = time.monotonic()
    with pytest.raises(SubmitError) as e:
        run_submit(orthanc, study, f"orthanc+{orthanc.url}", tmp_path, timeout_s=2)
    assert time.monotonic() - started < 30
    message = str(e.value)
    assert "\n" not in message and study["series_uid"] in message and "within 2 s" in message
    assert e.value.exit_code != 0 and isinstance(e.value, SegmapError)
    assert not (tmp_path / "result").exists()
    # The study itself was delivered: only the SEG was missing.
    assert orthanc.series_instance_count(study["series_uid"]) == 8


def test_submit_to_an_unreachable_node_is_one_line(orthanc, tmp_path):
    study = phantom(tmp_path / "ct")
    port = free_port()
    with pytest.raises(SubmitError) as e:
        submit(study["dicom_dir"], f"127.0.0.1:{port}/NOBODY", query=f"orthanc+{orthanc.url}",
               out_dir=tmp_path / "result", timeout_s=5)
    assert "\n" not in str(e.value) and f"127.0.0.1:{port}/NOBODY" in str(e.value)


def test_submit_to_an_unreachable_orthanc_query_is_one_line(tmp_path):
    study = phantom(tmp_path / "ct")
    port = free_port()
    with pytest.raises(SubmitError, match=rf"orthanc\+http://127.0.0.1:{port}: cannot reach Orthanc"):
        submit(study["dicom_dir"], f"127.0.0.1:{free_port()}", query=f"orthanc+http://127.0.0.1:{port}",
               out_dir=tmp_path / "result", timeout_s=5)


def test_folder_without_dicom_or_with_two_studies_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    with pytest.raises(SubmitError, match="no DICOM files found"):
        scan_study(empty)
    phantom(tmp_path / "two" / "a", seed=1)
    phantom(tmp_path / "two" / "b", seed=2)
    with pytest.raises(SubmitError, match="holds 2 studies"):
        scan_study(tmp_path / "two")


def test_only_image_series_of_the_filter_are_sent(tmp_path):
    study = phantom(tmp_path / "ct")
    make_seg(study, study["dicom_dir"] / "seg.dcm")  # a SEG in the folder is never sent back for segmentation
    found = scan_study(study["dicom_dir"])
    assert list(found.series) == [study["series_uid"]] and len(found.files) == 8
    assert list(found.skipped.values()) == ["SEG"]
    with pytest.raises(SubmitError, match="no MR series"):
        scan_study(study["dicom_dir"], modality_filter=("MR",))


@pytest.mark.parametrize("text", ["localhost", "host:port", "host:0", ":104", "host:104/" + "A" * 17])
def test_bad_target_is_refused(text):
    with pytest.raises(SubmitError, match="--to"):
        parse_node(text)


def test_target_default_ae_title():
    assert str(parse_node("pacs.local:11112")) == "pacs.local:11112/SEGMAP"
    assert str(parse_node("10.0.0.5:104/MYAE")) == "10.0.0.5:104/MYAE"


def test_segmap_submit_command_prints_the_saved_path_and_fails_in_one_line(orthanc, tmp_path, capsys):
    from segmap.cli import main

    # JPEG 2000 Lossless, as PACS archives often hold CT: sent as it is, no transcoding.
    study = phantom(tmp_path / "ct", seed=9, transfer_syntax=JPEG2000_LOSSLESS)
    argv = ["submit", str(study["dicom_dir"]), "--to", f"127.0.0.1:{orthanc.dicom_port}/{orthanc.aet}",
            "--query", f"orthanc+{orthanc.url}", "--out", str(tmp_path / "out"), "--timeout", "60"]
    service = PlayService(orthanc, study, tmp_path)
    service.start()
    assert main(argv) == 0
    service.join(30)
    out, err = capsys.readouterr()
    [saved] = out.split()
    assert Path(saved).parent == tmp_path / "out" and referenced_series(Path(saved)) == [study["series_uid"]]
    assert "sent 8/8" in err and NAME.split("^")[0] not in err and PATIENT_ID not in err
    import requests
    [first, *_] = requests.post(orthanc.url + "/tools/find", json={
        "Level": "Instance", "Query": {"SeriesInstanceUID": study["series_uid"]}}, timeout=10).json()
    assert requests.get(f"{orthanc.url}/instances/{first}/metadata/TransferSyntax", timeout=10).text == \
        JPEG2000_LOSSLESS

    # Sent again with one more instance: the SEG already there is not the answer -> one line, exit 2.
    ds = pydicom.dcmread(study["dicom_files"][-1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(study["dicom_dir"] / "extra.dcm", enforce_file_format=True)
    argv[argv.index("60")] = "1"
    assert main(argv) == 2
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("segmap: error:")]
    assert "within 1 s" in line and study["series_uid"] in line

    # An unreachable target: one line, exit 2, no pynetdicom chatter.
    argv[argv.index("--to") + 1] = f"127.0.0.1:{free_port()}/NOBODY"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert [x for x in err.splitlines() if "error" in x.lower()] == [x for x in err.splitlines()
                                                                    if x.startswith("segmap: error:")]
    assert "NOBODY" in err.splitlines()[-1]


SAMPLE_DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sample-ct" / "ct_dicom"


def test_files_whose_uids_were_blanked_are_refused_naming_one(tmp_path):
    study = phantom(tmp_path / "ct")
    ds = pydicom.dcmread(study["dicom_files"][2])
    ds.StudyInstanceUID = ds.SeriesInstanceUID = ""
    ds.save_as(study["dicom_files"][2])
    with pytest.raises(SubmitError, match=r"slice_0003.dcm: 1 DICOM file\(s\) .* have no StudyInstanceUID, "
                                          r"SeriesInstanceUID \(blanked"):
        scan_study(study["dicom_dir"])


def test_real_sample_ct_with_blanked_uids_is_refused_before_sending():
    if not SAMPLE_DICOM.is_dir():
        pytest.skip(f"shared sample data not found at {SAMPLE_DICOM}")
    with pytest.raises(SubmitError, match=r"20 DICOM file\(s\) .* have no StudyInstanceUID, SeriesInstanceUID, "
                                          r"SOPInstanceUID, SOPClassUID"):
        scan_study(SAMPLE_DICOM)


def test_dicom_query_names_a_refused_cget(tmp_path):
    """A node that answers C-FIND but refuses C-GET from us: one line that says so, not a silent wait."""
    server = Orthanc(tmp_path / "orthanc", free_port(), free_port(), modalities={"submit": {
        "AET": SUBMIT_AE, "Host": "127.0.0.1", "Port": free_port(), "AllowGet": False}}).start()
    try:
        study = phantom(tmp_path / "ct")
        server.upload(make_seg(study, tmp_path / "old-seg.dcm", n=6))  # a SEG series the C-FIND will find
        with pytest.raises(SubmitError) as e:
            run_submit(server, study, f"dicom://127.0.0.1:{server.dicom_port}/{server.aet}", tmp_path, timeout_s=5)
    finally:
        server.stop()
    assert "C-GET" in str(e.value) and SUBMIT_AE in str(e.value) and "\n" not in str(e.value)


def test_submit_waits_for_the_seg_of_every_job_the_study_makes(orthanc, tmp_path):
    """Two MAPs make a SEG each of one study: with ``expect=2`` the client does not stop at the first."""
    study = phantom(tmp_path / "ct")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = PlayService(orthanc, study, tmp_path / "a"), PlayService(orthanc, study, tmp_path / "b", delay=4)
    first.start()
    second.start()
    paths, lines = run_submit(orthanc, study, f"orthanc+{orthanc.url}", tmp_path, expect=2)
    first.join(30)
    second.join(30)
    assert first.error is None and second.error is None
    assert sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in paths) == sorted([first.seg_uid, second.seg_uid])
    assert "waiting up to 60 s for 2 SEG series" in " ".join(lines)
