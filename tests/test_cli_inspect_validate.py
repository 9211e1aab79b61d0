"""``segmap inspect`` and ``segmap validate`` as a user runs them: readable output, exit codes, and user mistakes
reported as one ``segmap: error:`` line without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SPLEEN_TASK

torch = pytest.importorskip("torch")
pytest.importorskip("dynamic_network_architectures", reason="dynamic-network-architectures builds the test network")

from segmap.cli import main  # noqa: E402
from segmap_tools.plans import build_network, make_dataset_json, make_plans  # noqa: E402
from segmap.model import export_monet  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning",
                                        "ignore:.*torch.jit.* is deprecated:DeprecationWarning")



@pytest.fixture(scope="module")
def spleen_model(tmp_path_factory) -> Path:
    plans = make_plans(patch_size=(16, 16, 16), spacing=(3.0, 1.5, 1.5), normalization_schemes=["CTNormalization"],
                       features=(4, 8), transpose_forward=(2, 0, 1))
    net = build_network(plans, "3d_fullres", 1, 2)
    path = tmp_path_factory.mktemp("cli") / "model.ts"
    return export_monet(path, net, plans, make_dataset_json({"background": 0, "spleen": 1}), "3d_fullres")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "segmap.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)


def assert_one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("segmap: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_inspect_shows_labels_inputs_and_geometry(capsys, spleen_model):
    assert main(["inspect", str(spleen_model)]) == 0
    out = capsys.readouterr().out
    assert str(spleen_model) in out
    assert "1: spleen" in out and "0: background" in out
    assert "0: image -> CT -> CTNormalization" in out
    assert "patch size: 16 x 16 x 16 voxels, network order (x, z, y)" in out
    assert "target spacing: 3 x 1.5 x 1.5 mm" in out
    assert "transpose_forward [2, 0, 1]" in out
    assert "in image (z, y, x) order: patch 16 x 16 x 16, spacing 1.5 x 1.5 x 3 mm" in out
    assert "3d_fullres" in out and "folds: 1" in out


def test_validate_ok(capsys, spleen_model):
    assert main(["validate", "--task", str(SPLEEN_TASK), "--model", str(spleen_model)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("OK: task 'Spleen'") and "1 segment(s)" in out


def test_validate_ok_as_a_subprocess(spleen_model):
    result = run_cli("validate", "-t", "tasks/spleen.yaml", "-m", str(spleen_model))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: task 'Spleen' (tasks/spleen.yaml)")


def test_validate_segment_mismatch_is_one_line_exit_2(tmp_path, spleen_model):
    doc = yaml.safe_load(SPLEEN_TASK.read_text())
    liver = dict(doc["tasks"]["Spleen"]["Segments"][0], segment_label="Liver")
    doc["tasks"]["Spleen"]["Segments"].append(liver)
    task = tmp_path / "two.yaml"
    task.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = run_cli("validate", "--task", str(task), "--model", str(spleen_model))
    assert result.returncode == 2
    assert result.stdout == ""
    line = assert_one_error_line(result.stderr)
    assert f"task 'Spleen' ({task}) has 2 segments but model ({spleen_model}) has 1 foreground label" in line
    assert "[1: Spleen | spleen] [2: Liver | —]" in line


def test_validate_modality_mismatch_exit_2(capsys, spleen_model):
    code = main(["validate", "--task", str(ROOT / "tasks" / "brain_tumour.yaml"), "--model", str(spleen_model)])
    assert code == 2
    err = assert_one_error_line(capsys.readouterr().err)
    assert "has 4 modalities but model" in err and "[1: T1C | image]" in err


@pytest.mark.parametrize("problem", ["missing-task", "bad-task-name", "missing-model", "text-model"])
def test_user_mistakes_are_one_line(tmp_path, capsys, spleen_model, problem):
    task, model, extra = str(SPLEEN_TASK), str(spleen_model), []
    if problem == "missing-task":
        task = str(tmp_path / "none.yaml")
    elif problem == "bad-task-name":
        extra = ["--task-name", "Liver"]
    elif problem == "missing-model":
        model = str(tmp_path / "none.ts")
    else:
        model = str(tmp_path / "model.ts")
        Path(model).write_text("not a model")
    assert main(["validate", "--task", task, "--model", model, *extra]) == 2
    line = assert_one_error_line(capsys.readouterr().err)
    assert (task if "task" in problem else model) in line


def test_inspect_plain_torchscript_is_one_line(tmp_path, spleen_model):
    net = torch.jit.load(str(spleen_model))
    plain = tmp_path / "plain.ts"
    torch.jit.save(net, str(plain))
    result = run_cli("inspect", str(plain))
    assert result.returncode == 2
    assert "no embedded inference.json with nnU-Net plans" in assert_one_error_line(result.stderr)
