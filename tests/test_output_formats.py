"""Output formats come from one registry, separate from the input kind; DICOM in -> NIfTI out works end to end
through it (the command line, the MONAI Deploy application and a packaged variant), and the graph says what runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import DEMO_MODEL, ROOT, SPLEEN_TASK

from segmap.demo.phantom import make_phantom, write_dicom_series
from segmap.errors import SegmapError
from segmap.outputs.formats import FORMATS, output_format, variants



@pytest.fixture(scope="module")
def dicom_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    p = make_phantom((32, 96, 96), (3.0, 1.8, 1.8), seed=5)
    write_dicom_series(p, root / "ct")
    return root


def series_volume(folder: Path):
    from segmap.dicom.loading import scan_dicom_folder
    from segmap.dicom.series_volume import series_to_volume

    return series_to_volume(scan_dicom_folder(folder).series[0])


def test_registry_pairs_inputs_and_formats():
    assert output_format("auto", "dicom").name == "dicom-seg"
    assert output_format("auto", "nifti").name == "nifti"
    assert output_format("nifti", "dicom").name == "nifti"
    with pytest.raises(SegmapError, match="output format dicom-seg needs dicom input, but the input is nifti"):
        output_format("dicom-seg", "nifti")
    assert {n: (v.input_kind, v.output_format.name) for n, v in variants().items()} == {
        "dicom": ("dicom", "dicom-seg"), "nifti": ("nifti", "nifti"), "dicom-nifti": ("dicom", "nifti")}
    for f in FORMATS.values():  # every registered writer class exists and has the writer's shape
        module, _, cls = f.writer.partition(":")
        assert callable(getattr(__import__(module, fromlist=[cls]), cls).write)


def check_nifti_matches_seg(nifti: Path, seg: Path, study: Path) -> None:
    from segmap.outputs.nifti import read_label_nifti
    from segmap.outputs.seg import read_seg_labels

    volume = series_volume(study)
    labels, affine = read_label_nifti(nifti)
    assert np.allclose(affine, volume.affine, atol=1e-4)  # the DICOM series' grid, in RAS
    seg_labels = read_seg_labels(seg, volume.meta["sop_instance_uids"])
    assert labels.shape == seg_labels.shape and np.array_equal(labels, seg_labels)
    assert (labels == 1).sum() > 100


def test_dicom_to_nifti_from_the_command_line(dicom_study, tmp_path):
    common = [sys.executable, "-m", "segmap.cli", "run", "-m", str(DEMO_MODEL), "-t", str(SPLEEN_TASK),
              "-i", str(dicom_study), "--device", "cpu"]
    nifti = subprocess.run(common + ["-o", str(tmp_path / "n"), "--output-format", "nifti"], capture_output=True,
                           text=True, timeout=600)
    assert nifti.returncode == 0, nifti.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["overlay.png", "run_report.json",
                                                                    "segmentation.nii.gz"]
    seg = subprocess.run(common + ["-o", str(tmp_path / "s")], capture_output=True, text=True, timeout=600)
    assert seg.returncode == 0, seg.stderr[-3000:]
    check_nifti_matches_seg(tmp_path / "n" / "segmentation.nii.gz", tmp_path / "s" / "segmentation.dcm", dicom_study)
    report = json.loads((tmp_path / "n" / "run_report.json").read_text())
    assert [o["kind"] for o in report["outputs"]] == ["nifti", "overlay-png"]
    assert report["inputs"][0]["SeriesInstanceUID"]  # the DICOM provenance is kept


def test_dicom_to_nifti_in_the_application(dicom_study, tmp_path):
    env = {**os.environ, "SEGMAP_TASK_FILE": str(SPLEEN_TASK), "SEGMAP_DEVICE": "cpu",
           "SEGMAP_OUTPUT_FORMAT": "nifti"}
    proc = subprocess.run([sys.executable, str(ROOT / "app"), "-i", str(dicom_study), "-o", str(tmp_path / "out"),
                           "-m", str(DEMO_MODEL)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "segmentation.nii.gz").is_file()
    bad = subprocess.run([sys.executable, str(ROOT / "app"), "-i", str(dicom_study), "-o", str(tmp_path / "bad"),
                          "-m", str(DEMO_MODEL)], capture_output=True, text=True, timeout=600,
                         env={**env, "SEGMAP_OUTPUT_FORMAT": "png"})
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("segmap: error: SEGMAP_OUTPUT_FORMAT: output_format must")


def test_packaged_dicom_nifti_variant(tmp_path):
    from segmap.packager.context import write_context

    ctx = write_context(tmp_path / "ctx", model=DEMO_MODEL, task=SPLEEN_TASK, task_name=None, variant="dicom-nifti",
                        app_dir=ROOT / "app", package_source=ROOT, tag="segmap/spleen:1.0", wheelhouse=None,
                        requirements=([], []))
    config = yaml.safe_load((ctx / "app.yaml").read_text())
    assert (config["segmap"]["input_kind"], config["segmap"]["output_format"]) == ("dicom", "nifti")
    manifest = json.loads((ctx / "app.json").read_text())
    assert manifest["input"]["formats"] == ["application/dicom"]
    assert manifest["output"]["formats"] == ["application/x-nifti", "application/json"]


@pytest.mark.parametrize("kind", ["dicom", "nifti"])
def test_compose_shows_named_ports(kind, tmp_path):
    """The graph is the product's map: what flows between operators is named, and nothing else connects them."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "ERROR")
    from app.app import SegmapApp
    from operators import Outcome
    from segmap.run import start
    from segmap.settings import Settings

    context = start(Settings(models=DEMO_MODEL, task_file=SPLEEN_TASK, input=tmp_path, output=tmp_path / "out",
                             input_kind=kind))
    app = SegmapApp(context=context, writer=context.writer, outcome=Outcome())
    app.compose_graph()
    graph = app.graph
    flows = {(a.name, b.name): {k: sorted(v) for k, v in graph.get_port_map(a, b).items()}
             for a in graph.get_nodes() for b in graph.get_next_nodes(a)}
    load = "series_to_volume" if kind == "dicom" else "nifti_loader"
    expected = {
        (load, "nnunet_inference"): {"image": ["image"]},
        (load, "result_writer"): {"image": ["image"]},
        ("nnunet_inference", "result_writer"): {"labels": ["labels"]},
    }
    if kind == "dicom":
        expected[("dicom_scan", "series_selector")] = {"study": ["study"]}
        expected[("series_selector", "series_to_volume")] = {"series": ["series"]}
    assert flows == expected


def test_precision_step_and_seg_type_settings_reach_the_engine_and_the_writer(dicom_study, tmp_path):
    import pydicom

    proc = subprocess.run([sys.executable, "-m", "segmap.cli", "run", "-m", str(DEMO_MODEL), "-t", str(SPLEEN_TASK),
                           "-i", str(dicom_study), "-o", str(tmp_path / "o"), "--device", "cpu", "--no-overlay",
                           "--segmentation-type", "labelmap", "--precision", "exact", "--tile-step-size", "0.75"],
                          capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seg = pydicom.dcmread(tmp_path / "o" / "segmentation.dcm", stop_before_pixels=True)
    assert seg.SegmentationType == "LABELMAP"
    report = json.loads((tmp_path / "o" / "run_report.json").read_text())
    assert report["engine"]["precision"] == "exact" and report["engine"]["arithmetic"] == "fp32"
    assert report["engine"]["tile_step"] == 0.75 and report["engine"]["network_calls"] > 0
    assert [o["kind"] for o in report["outputs"]] == ["dicom-seg"]  # --no-overlay


def test_openvino_setting_reaches_the_engine(dicom_study, tmp_path):
    """``--openvino`` with ``--precision fast``: OpenVINO competes (installed) or the log says how to install it."""
    import importlib.util

    proc = subprocess.run([sys.executable, "-m", "segmap.cli", "run", "-m", str(DEMO_MODEL), "-t", str(SPLEEN_TASK),
                           "-i", str(dicom_study), "-o", str(tmp_path / "o"), "--device", "cpu", "--no-overlay",
                           "--precision", "fast", "--openvino", "--mirroring"],  # calls enough to choose a path
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "o" / "run_report.json").read_text())
    assert report["engine"]["precision"] == "fast" and report["engine"]["tile_step"] == 0.5
    if importlib.util.find_spec("openvino") is None:
        assert "openvino package is not installed" in proc.stderr
        assert report["engine"]["network_path"].startswith("torchscript")
    else:  # first among the candidates, so it is always timed (bf16 or fp32 by the CPU)
        assert "network path:" in proc.stderr and "openvino " in proc.stderr.split("network path:")[1], \
            proc.stderr[-3000:]
