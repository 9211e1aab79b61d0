"""``segmap convert``: nnU-Net results folder -> MONet ``fold_K/model.ts`` files that segmap and MONet's own tooling
both accept, checked against the checkpoints, written only when every fold converted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("dynamic_network_architectures")

from segmap.cli import main  # noqa: E402
from segmap.convert import ConvertedFold, convert_results_folder  # noqa: E402
from segmap_tools.plans import build_network, make_dataset_json, make_plans, write_nnunet_results_folder  # noqa: E402
from segmap.errors import ModelError  # noqa: E402
from segmap.model import load_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning",
                                        "ignore:.*torch.jit.* is deprecated:DeprecationWarning")

PATCH = (16, 32, 32)
LABELS = {"background": 0, "spleen": 1, "liver": 2, "bone": 3}
METADATA = {"version": "1.2.0", "task": "Abdominal organs", "intended_use": "research only",
            "network_data_format": {"inputs": {"image": {"type": "image", "modality": "CT", "num_channels": 1}}}}


def make_results(root: Path, folds=2, change=None) -> Path:
    plans = make_plans(patch_size=PATCH, spacing=(3.0, 1.5, 1.5), normalization_schemes=["CTNormalization"],
                       features=(4, 8, 16))
    if change:
        change(plans["configurations"]["3d_fullres"])
    states = []
    for k in range(folds):
        torch.manual_seed(k)
        states.append(build_network(make_plans(patch_size=PATCH, spacing=(3.0, 1.5, 1.5),
                                               normalization_schemes=["CTNormalization"], features=(4, 8, 16)),
                                    "3d_fullres", 1, len(LABELS)).state_dict())
    return write_nnunet_results_folder(root, plans, make_dataset_json(LABELS), states)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return make_results(tmp_path_factory.mktemp("nnunet") / "results")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, results) -> Path:
    meta = tmp_path_factory.mktemp("meta") / "metadata.json"
    meta.write_text(json.dumps(METADATA))
    out = tmp_path_factory.mktemp("converted") / "model"
    assert main(["convert", str(results), "--metadata", str(meta), "-o", str(out)]) == 0
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("segmap: error: ") and "\n" not in err, err
    return err


def checkpoint_network(results: Path, fold: int):
    model = load_model(results, folds=str(fold))
    return model.build_fold_network(0, "cpu")


# ------------------------------------------------------------------------------------------------ what it writes


def test_convert_writes_one_model_per_fold_and_reports_the_difference(tmp_path, results, capsys):
    out = tmp_path / "model"
    assert main(["convert", str(results), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    for k in (0, 1):
        assert (out / f"fold_{k}" / "model.ts").is_file()
        assert f"fold_{k}: {results / f'fold_{k}' / 'checkpoint_final.pth'} -> {out / f'fold_{k}' / 'model.ts'}" \
               in printed
    assert printed.count("max |diff| 0 vs the checkpoint on a random 1x1x16x32x32 input") == 2
    assert sorted(p.name for p in out.iterdir()) == ["fold_0", "fold_1"]  # no staging left behind
    model = load_model(out)
    assert model.fold_names == ["fold_0", "fold_1"] and model.spec.configuration == "3d_fullres"
    assert model.spec.foreground_labels == [(1, "spleen"), (2, "liver"), (3, "bone")]


def test_converted_model_loads_the_way_monet_loads_it(converted, results):
    """MONet's inference: torch.jit.load with _extra_files, metadata's network_data_format, inference.json's
    network_def / nnunet_config_dict / nnunet_config_ckpt, plans and dataset_json; the network swapped in."""
    path = converted / "fold_1" / "model.ts"
    extra_files = {"inference.json": "", "metadata.json": ""}
    network = torch.jit.load(str(path), _extra_files=extra_files)
    inference = json.loads(extra_files["inference.json"])
    metadata = json.loads(extra_files["metadata.json"])

    fmt = metadata["network_data_format"]
    assert list(fmt["inputs"]) == ["image"]
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "spleen", "2": "liver", "3": "bone"}
    assert metadata["intended_use"] == "research only" and metadata["version"] == "1.2.0"

    assert inference["plans"] == json.loads((results / "plans.json").read_text())
    assert inference["dataset_json"] == json.loads((results / "dataset.json").read_text())
    assert inference["nnunet_trainer_class_name"] == "nnUNetTrainer"
    assert inference["nnunet_configuration"] == "3d_fullres"
    assert inference["nnunet_config_ckpt"] == {"trainer_name": "@nnunet_trainer_class_name",
                                               "configuration": "@nnunet_configuration",
                                               "inference_allowed_mirroring_axes": [0, 1, 2]}
    assert inference["nnunet_config_dict"]["nnunet_config"] == "@nnunet_config_ckpt"
    assert inference["network_def"].startswith("$monai.apps.nnunet.nnunet_bundle.get_nnunet_monai_predictor(")
    assert inference["fold_id"] == 1 and inference["model_name"] == "checkpoint_final.pth"

    x = torch.randn(1, 1, *PATCH, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(network(x), checkpoint_network(results, 1)(x))


def test_monai_config_parser_resolves_what_monet_passes_to_its_predictor(converted):
    bundle = pytest.importorskip("monai.bundle")
    extra_files = {"inference.json": ""}
    torch.jit.load(str(converted / "fold_0" / "model.ts"), _extra_files=extra_files)
    parser = bundle.ConfigParser(json.loads(extra_files["inference.json"]))
    config = parser.get_parsed_content("nnunet_config_dict")
    assert config["nnunet_config"] == {"trainer_name": "nnUNetTrainer", "configuration": "3d_fullres",
                                       "inference_allowed_mirroring_axes": [0, 1, 2]}
    assert config["model_folder"] == "./models/fold_0" and config["model_name"] == "checkpoint_final.pth"
    assert config["plans"]["configurations"]["3d_fullres"]["patch_size"] == list(PATCH)
    assert config["dataset_json"]["labels"] == LABELS


def test_chosen_folds_and_checkpoint(tmp_path, results):
    best = torch.load(results / "fold_0" / "checkpoint_final.pth", weights_only=False)
    folder = make_results(tmp_path / "r")
    torch.manual_seed(7)
    best["network_weights"] = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                               for k, v in best["network_weights"].items()}
    torch.save(best, folder / "fold_0" / "checkpoint_best.pth")
    done = convert_results_folder(folder, tmp_path / "m", folds="0", checkpoint="best")
    assert [c.fold for c in done] == ["fold_0"] and isinstance(done[0], ConvertedFold)
    assert done[0].max_abs_diff == 0.0 and done[0].max_abs_logit > 0
    x = torch.randn(1, 1, *PATCH, generator=torch.Generator().manual_seed(1))
    net = torch.jit.load(str(tmp_path / "m" / "fold_0" / "model.ts"))
    best_net = load_model(folder, folds="0", checkpoint="best").build_fold_network(0, "cpu")
    with torch.no_grad():
        assert torch.equal(net(x), best_net(x))


# ------------------------------------------------------------------------------------------------ what it refuses


def test_architecture_it_cannot_rebuild_is_refused_before_writing(tmp_path, capsys):
    folder = make_results(tmp_path / "r", folds=1,
                          change=lambda c: c["architecture"].update(network_class_name="lab.nets.Fancy"))
    out = tmp_path / "model"
    assert main(["convert", str(folder), "-o", str(out)]) == 2
    assert "network class 'lab.nets.Fancy' cannot be imported" in one_error_line(capsys)
    assert not out.exists()


def test_weights_that_do_not_fit_are_refused(tmp_path, capsys):
    folder = make_results(tmp_path / "r", folds=1,
                          change=lambda c: c["architecture"]["arch_kwargs"].update(n_conv_per_stage=[1, 1, 1]))
    assert main(["convert", str(folder), "-o", str(tmp_path / "model")]) == 2
    err = one_error_line(capsys)
    assert "the weights do not fit the network the plans describe" in err and "unexpected" in err
    assert not (tmp_path / "model" / "fold_0").exists()


def test_stock_network_cannot_be_scripted_and_says_how_to_convert(tmp_path, results, capsys):
    assert main(["convert", str(results), "-o", str(tmp_path / "m"), "--script", "--folds", "0"]) == 2
    err = one_error_line(capsys)
    assert "cannot be scripted" in err and "without --script" in err


def test_existing_models_are_kept_unless_forced(tmp_path, results, capsys):
    out = tmp_path / "m"
    assert main(["convert", str(results), "-o", str(out), "--folds", "0"]) == 0
    before = (out / "fold_0" / "model.ts").stat().st_mtime_ns
    assert main(["convert", str(results), "-o", str(out), "--folds", "0"]) == 2
    assert "already exists (use --force" in one_error_line(capsys)
    assert (out / "fold_0" / "model.ts").stat().st_mtime_ns == before
    assert main(["convert", str(results), "-o", str(out), "--folds", "0", "--force"]) == 0


def test_a_conversion_that_changes_the_logits_is_not_written(tmp_path, results):
    # A negative tolerance makes even an exact conversion "differ": the refusal path, with the real files.
    with pytest.raises(ModelError) as info:
        convert_results_folder(results, tmp_path / "m", tolerance=-1.0)
    assert "differs from the checkpoint's by max |diff| 0" in str(info.value)
    assert not list((tmp_path / "m").glob("fold_*"))


@pytest.mark.parametrize("content, expected", [
    ("{not json", "metadata file is not valid JSON"),
    (json.dumps({"network_data_format": {"inputs": {"t1": {}, "t2": {}}}}),
     "network_data_format.inputs ['t1', 't2'] must name one input per dataset.json channel (1: ['CT'])"),
], ids=["not-json", "wrong-inputs"])
def test_bad_metadata_is_refused(tmp_path, results, capsys, content, expected):
    meta = tmp_path / "metadata.json"
    meta.write_text(content)
    assert main(["convert", str(results), "--metadata", str(meta), "-o", str(tmp_path / "m")]) == 2
    err = one_error_line(capsys)
    assert expected in err and str(meta) in err


def test_not_a_results_folder(tmp_path, capsys):
    assert main(["convert", str(tmp_path), "-o", str(tmp_path / "m")]) == 2
    assert "not an nnU-Net results folder" in one_error_line(capsys)
