"""MONet model files: real model.ts archives load with their plans, and broken or foreign files fail with a one-line
message that names the file and says what was expected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("dynamic_network_architectures", reason="dynamic-network-architectures builds the test network")

from segmap_tools.plans import build_network, make_dataset_json, make_plans  # noqa: E402
from segmap.errors import ModelError  # noqa: E402
from segmap.model import export_monet, load_model  # noqa: E402
from segmap.summary import describe_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning",
                                        "ignore:.*torch.jit.* is deprecated:DeprecationWarning")

PATCH = (16, 16, 16)
LABELS = {"background": 0, "spleen": 1}


def tiny_plans(**kw):
    args = dict(patch_size=PATCH, spacing=(3.0, 1.5, 1.5), normalization_schemes=["CTNormalization"],
                features=(4, 8))
    args.update(kw)
    return make_plans(**args)


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return build_network(tiny_plans(), "3d_fullres", 1, len(LABELS))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, network):
    path = tmp_path_factory.mktemp("model") / "model.ts"
    return export_monet(path, network, tiny_plans(), make_dataset_json(LABELS), "3d_fullres")


def model_error(path) -> str:
    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


def traced(network):
    with torch.no_grad():
        return torch.jit.trace(network.eval(), torch.zeros(1, 1, *PATCH), check_trace=False)


# ------------------------------------------------------------------------------------------------- good models


def test_exported_model_reads_plans_without_loading_weights(model_file):
    model = load_model(model_file)
    spec = model.spec
    assert model.num_folds == 1 and model.fold_files == [model_file]
    assert spec.configuration == "3d_fullres"
    assert spec.patch_size == PATCH
    assert spec.target_spacing == (3.0, 1.5, 1.5)
    assert spec.input_names == ("image",)
    assert spec.channel_names == ("CT",)
    assert spec.foreground_labels == [(1, "spleen")]
    assert spec.normalization[0].scheme == "CTNormalization"
    assert spec.mirroring_axes == (0, 1, 2)


def test_network_loads_and_gives_logits_per_label(model_file):
    (net,) = load_model(model_file).load_networks("cpu")
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *PATCH))
    assert tuple(out.shape) == (1, len(LABELS), *PATCH)


def test_fold_folder_loads_as_ensemble(tmp_path, model_file):
    for k in (1, 0):
        (tmp_path / f"fold_{k}").mkdir()
        shutil.copy(model_file, tmp_path / f"fold_{k}" / "model.ts")
    (tmp_path / "notes").mkdir()  # unrelated folders are ignored
    model = load_model(tmp_path)
    assert model.num_folds == 2
    assert model.fold_files == [tmp_path / "fold_0" / "model.ts", tmp_path / "fold_1" / "model.ts"]
    summary = describe_model(model)
    assert "folds: 2" in summary and "fold_1" in summary


def test_folder_with_a_single_model_ts(tmp_path, model_file):
    shutil.copy(model_file, tmp_path / "model.ts")
    model = load_model(tmp_path)
    assert model.fold_files == [tmp_path / "model.ts"]
    assert "folds: 1 (single model.ts)" in describe_model(model)


def test_input_names_come_from_metadata(tmp_path, network):
    plans = tiny_plans(normalization_schemes=["ZScoreNormalization"] * 2)
    ds = make_dataset_json(LABELS, channel_names=("MR", "MR"))
    net = build_network(plans, "3d_fullres", 2, len(LABELS))
    from segmap.model import default_metadata

    meta = default_metadata(ds, input_names=["T1", "T2"], description="two-channel test")
    model = load_model(export_monet(tmp_path / "m.ts", net, plans, ds, "3d_fullres", metadata=meta))
    assert model.spec.input_names == ("T1", "T2")
    summary = describe_model(model)
    assert "0: T1 -> MR -> ZScoreNormalization" in summary and "two-channel test" in summary


# ------------------------------------------------------------------------------------------------- model errors


def test_torchscript_without_extra_files_says_no_embedded_plans(tmp_path, network):
    path = tmp_path / "plain.ts"
    torch.jit.save(traced(network), str(path))
    message = model_error(path)
    assert "no embedded inference.json with nnU-Net plans" in message and "MONet" in message


def test_truncated_file(tmp_path, model_file):
    path = tmp_path / "truncated.ts"
    data = Path(model_file).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "not a TorchScript model archive" in model_error(path)


def test_plain_text_file(tmp_path):
    path = tmp_path / "model.ts"
    path.write_text("this is not a model\n")
    assert "not a TorchScript model archive" in model_error(path)


def test_missing_path(tmp_path):
    assert "not found" in model_error(tmp_path / "missing.ts")


def test_empty_folder(tmp_path):
    assert "neither model.ts nor fold_K/model.ts" in model_error(tmp_path)


def test_zip_without_torchscript_module(tmp_path):
    import zipfile

    path = tmp_path / "fake.ts"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fake/extra/inference.json", json.dumps({"plans": {}}))
    assert "holds no TorchScript module" in model_error(path)


def test_inference_json_without_plans(tmp_path, network):
    path = tmp_path / "noplans.ts"
    inference = {"dataset_json": make_dataset_json(LABELS), "nnunet_configuration": "3d_fullres"}
    torch.jit.save(traced(network), str(path), _extra_files={"inference.json": json.dumps(inference)})
    message = model_error(path)
    assert "inference.json has no 'plans'" in message


def test_inference_json_not_json(tmp_path, network):
    path = tmp_path / "badjson.ts"
    torch.jit.save(traced(network), str(path), _extra_files={"inference.json": "{plans: oops"})
    assert "embedded inference.json is not valid JSON" in model_error(path)


def test_folds_with_different_plans_are_refused(tmp_path, model_file, network):
    (tmp_path / "fold_0").mkdir()
    shutil.copy(model_file, tmp_path / "fold_0" / "model.ts")
    other = tiny_plans(spacing=(2.0, 1.0, 1.0))
    export_monet(tmp_path / "fold_1" / "model.ts", network, other, make_dataset_json(LABELS), "3d_fullres")
    with pytest.raises(ModelError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert "fold_1" in message and "differ" in message and "fold_0" in message and "\n" not in message


def test_network_that_cannot_be_deserialised(tmp_path, model_file):
    import zipfile

    # Keep the plans but drop the serialised code: inspecting works, loading the network fails cleanly.
    path = tmp_path / "nocode.ts"
    with zipfile.ZipFile(model_file) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            if "/code/" not in item.filename:
                dst.writestr(item, src.read(item))
    model = load_model(path)
    with pytest.raises(ModelError) as info:
        model.load_networks("cpu")
    assert str(path) in str(info.value) and "cannot load the TorchScript network" in str(info.value)
