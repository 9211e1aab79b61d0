"""nnU-Net results folders as models: ``--model RESULTS_DIR`` works wherever a model.ts does.

The label map of a results folder must equal, voxel for voxel on the CPU, the one of the model.ts that
``segmap convert`` writes from it, and match nnUNetPredictor on the same folder (Dice >= 0.999). Folds and
checkpoints are selectable; what cannot be rebuilt is refused with a one-line reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

torch = pytest.importorskip("torch")
pytest.importorskip("dynamic_network_architectures")

from segmap.cli import main  # noqa: E402
from segmap.convert import convert_results_folder  # noqa: E402
from segmap.demo.phantom import make_phantom, write_nifti  # noqa: E402
from segmap_tools.plans import make_dataset_json, make_plans, write_nnunet_results_folder  # noqa: E402
from segmap.engine import EngineOptions, Segmenter  # noqa: E402
from segmap.errors import ModelError  # noqa: E402
from segmap.model import load_model  # noqa: E402
from segmap.model.nnunet_results import ResultsFolderModel, rebuild_network  # noqa: E402
from segmap.summary import describe_model  # noqa: E402

# The module's results folder holds the fidelity network (trained once per machine and cached): the fidelity tier.
pytestmark = [pytest.mark.fidelity,
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning",
                                         "ignore:.*torch.jit.* is deprecated:DeprecationWarning")]

CT_PROPS = {"mean": 80.0, "std": 250.0, "percentile_00_5": -150.0, "percentile_99_5": 1000.0}
LABELS = {"background": 0, "spleen": 1, "liver": 2, "bone": 3}
TASK = """\
tasks:
  Organs:
    Modalities:
      image:
        File_Pattern: ".nii.gz"
    Segments:
{segments}
"""


def plans_for(**kw) -> dict:
    args = dict(patch_size=(24, 48, 48), spacing=(3.0, 1.5, 1.5), normalization_schemes=["CTNormalization"],
                intensity_properties=[CT_PROPS], features=(6, 12, 24))
    args.update(kw)
    return make_plans(**args)


def task_file(path: Path, names=("Spleen", "Liver", "Bone")) -> Path:
    segments = "\n".join(
        f'      - segment_label: "{n}"\n'
        f'        segmented_property_category: {{code: "123037004", scheme: "SCT", meaning: "Anatomical Structure"}}\n'
        f'        segmented_property_type: {{code: "{i}", scheme: "SCT", meaning: "{n}"}}\n'
        f'        algorithm_name: "test"' for i, n in enumerate(names, start=1))
    path.write_text(TASK.format(segments=segments))
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory, trained) -> Path:
    """A two-fold results folder of the fidelity network (fold 1 perturbed), with a checkpoint_best in fold 0."""
    plans = plans_for()
    folder = write_nnunet_results_folder(tmp_path_factory.mktemp("nnunet") / "results", plans,
                                         make_dataset_json(LABELS), [trained(plans, 0), trained(plans, 1)])
    best = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    best["network_weights"] = trained(plans, 2)
    torch.save(best, folder / "fold_0" / "checkpoint_best.pth")
    return folder


def image_case(seed=5, shape=(32, 80, 80), spacing=(3.0, 1.5, 1.5)):
    return make_phantom(shape, spacing, seed=seed, extra_labels=True), spacing


# ------------------------------------------------------------------------------------------------ same label map


def test_results_folder_equals_its_converted_model_and_nnunet(tmp_path, results):
    pytest.importorskip("nnunetv2")
    from nnunet_reference import dice_per_label, nnunet_predict

    phantom, spacing = image_case()
    image = phantom.hu[None].astype(np.float32)
    converted = convert_results_folder(results, tmp_path / "model")
    assert [c.fold for c in converted] == ["fold_0", "fold_1"]

    maps = {}
    for name, path in (("results", results), ("model.ts", tmp_path / "model")):
        for optimize in (False, True):  # the exact CPU path, and the frozen/fused default
            seg = Segmenter(load_model(path), EngineOptions(device="cpu", optimize=optimize))
            maps[name, optimize] = seg.predict(image, spacing)
    assert np.array_equal(maps["results", False], maps["model.ts", False])
    assert np.array_equal(maps["results", True], maps["model.ts", True])

    reference = nnunet_predict(results, 2, image, spacing, mirroring=False)
    present = [v for v in (1, 2, 3) if (reference == v).mean() >= 0.002]
    assert len(present) >= 2
    dice = dice_per_label(reference, maps["results", False])
    assert all(dice[v] >= 0.999 for v in present), dice
    print(f"results folder vs converted model.ts: identical; Dice vs nnUNetPredictor {dice}")


@pytest.mark.e2e
def test_run_inspect_validate_take_a_results_folder(tmp_path, results, capsys):
    task = task_file(tmp_path / "task.yaml")
    assert main(["inspect", str(results)]) == 0
    out = capsys.readouterr().out
    assert "nnU-Net results folder, checkpoint_final.pth" in out and "PlainConvUNet" in out
    assert "folds: 2" in out and "1: spleen" in out and "3d_fullres, trainer nnUNetTrainer" in out

    assert main(["validate", "--task", str(task), "--model", str(results)]) == 0
    assert "agrees with model" in capsys.readouterr().out

    phantom, _ = image_case(shape=(24, 64, 64))
    write_nifti(phantom, tmp_path / "in" / "ct.nii.gz")
    out_dir = tmp_path / "out"
    assert main(["run", "--task", str(task), "--model", str(results), "-i", str(tmp_path / "in"),
                 "-o", str(out_dir), "--device", "cpu"]) == 0
    report = json.loads((out_dir / "run_report.json").read_text())
    assert report["model"]["folds"] == ["fold_0", "fold_1"]
    assert [Path(f["path"]).name for f in report["model"]["files"]] == ["checkpoint_final.pth"] * 2
    assert sum(s["voxels"] for s in report["segments"]) > 0
    assert (out_dir / "segmentation.nii.gz").is_file()


def test_segmap_validate_names_a_mismatch_with_a_results_folder(tmp_path, results, capsys):
    task = task_file(tmp_path / "task.yaml", names=("Spleen",))
    assert main(["validate", "--task", str(task), "--model", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("segmap: error:") and "\n" not in err and str(results) in err


# ------------------------------------------------------------------------------------- folds and checkpoints


def first_logits(model, x):
    (net,) = model.load_networks("cpu")
    with torch.no_grad():
        return net(x)


def test_fold_and_checkpoint_selection(results, trained):
    model = load_model(results)
    assert isinstance(model, ResultsFolderModel) and model.fold_names == ["fold_0", "fold_1"]
    assert load_model(results, folds="1").fold_files == [results / "fold_1" / "checkpoint_final.pth"]
    assert load_model(results, folds=[0]).fold_names == ["fold_0"]

    best = load_model(results, folds="0", checkpoint="best")
    assert best.fold_files == [results / "fold_0" / "checkpoint_best.pth"]
    x = torch.randn(1, 1, 24, 48, 48, generator=torch.Generator().manual_seed(0))
    final = load_model(results, folds="0")
    expected = rebuild_network(results / "fold_0" / "checkpoint_best.pth", final.plans, final.spec, "cpu")
    with torch.no_grad():
        want = expected(x)
    assert torch.equal(first_logits(best, x), want)
    assert not torch.equal(first_logits(final, x), want)


def test_fold_all_is_used_only_when_asked_or_alone(tmp_path, results):
    folder = tmp_path / "r"
    shutil.copytree(results, folder)
    shutil.copytree(folder / "fold_1", folder / "fold_all")
    assert load_model(folder).fold_names == ["fold_0", "fold_1"]
    assert load_model(folder, folds="all").fold_names == ["fold_all"]
    shutil.rmtree(folder / "fold_0")
    shutil.rmtree(folder / "fold_1")
    assert load_model(folder).fold_names == ["fold_all"]


def error_of(path, **kw) -> str:
    with pytest.raises(ModelError) as info:
        load_model(path, **kw).load_networks("cpu")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_fold_and_missing_checkpoint(tmp_path, results):
    message = error_of(results, folds="0,3")
    assert "no checkpoint_final.pth for fold_3 (found: fold_0, fold_1)" in message
    folder = tmp_path / "r"
    shutil.copytree(results, folder)
    for f in folder.glob("fold_*/checkpoint_final.pth"):
        f.unlink()
    message = error_of(folder)
    assert "no fold_K/checkpoint_final.pth" in message and "checkpoint_best.pth" in message
    assert load_model(folder, checkpoint="best").fold_names == ["fold_0"]  # the only fold with a best checkpoint
    assert "neither final nor best" in error_of(results, checkpoint="latest")


def copy_with_plans(tmp_path, results, change) -> Path:
    folder = tmp_path / "r"
    shutil.copytree(results, folder)
    plans = json.loads((folder / "plans.json").read_text())
    change(plans["configurations"]["3d_fullres"])
    (folder / "plans.json").write_text(json.dumps(plans))
    return folder


@pytest.mark.parametrize("change, expected", [
    (lambda c: c["architecture"].update(network_class_name="my_lab.nets.FancyUNet"),
     "network class 'my_lab.nets.FancyUNet' cannot be imported"),
    (lambda c: c["architecture"]["arch_kwargs"].update(features_per_stage=[8, 16, 32]),
     "the weights do not fit the network the plans describe"),
    (lambda c: c.update(previous_stage="3d_lowres"), "is a cascade stage"),
    (lambda c: (c.pop("architecture"), c.update(UNet_class_name="PlainConvUNet")), "nnU-Net before 2.4"),
], ids=["unknown-class", "weights-do-not-fit", "cascade", "legacy-plans"])
def test_architectures_that_cannot_be_rebuilt_are_refused(tmp_path, results, change, expected):
    folder = copy_with_plans(tmp_path, results, change)
    message = error_of(folder)
    assert expected in message and str(folder) in message


def test_results_folder_summary(results):
    summary = describe_model(load_model(results, folds="1", checkpoint="final"))
    assert "folds: 1" in summary and "fold_1/checkpoint_final.pth" in summary


def test_where_model_ts_files_are_needed_a_results_folder_says_convert_first(results):
    from segmap.model import find_fold_files

    with pytest.raises(ModelError) as info:
        find_fold_files(results)
    assert str(info.value) == (f"{results}: an nnU-Net results folder holds no model.ts files; convert it first: "
                               f"segmap convert {results} -o MODEL_DIR")


def test_package_takes_a_results_folder(tmp_path, results):
    """`segmap package --model RESULTS_DIR`: the image gets the converted fold_K/model.ts files, checked against the
    checkpoints, and they read back as the results folder's model."""
    from segmap.packager.context import write_context

    ctx = write_context(tmp_path / "ctx", model=results, task=task_file(tmp_path / "task.yaml"), task_name=None,
                        variant="nifti", app_dir=ROOT / "app", package_source=ROOT, tag="segmap/organs:1.0",
                        requirements=([], []), folds="1", checkpoint="final")
    packaged = load_model(ctx / "models" / "organs")
    assert [f.parent.name for f in packaged.fold_files] == ["fold_1"]
    assert packaged.spec.foreground_labels == load_model(results).spec.foreground_labels
    x = torch.randn(1, 1, 24, 48, 48)
    direct = load_model(results, folds="1").load_networks("cpu")[0]
    (converted,) = packaged.load_networks("cpu")
    with torch.no_grad():
        assert torch.allclose(direct(x), converted(x), atol=1e-4)
