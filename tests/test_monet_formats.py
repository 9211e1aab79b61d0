"""Every MONet model.ts format in the wild loads and runs like nnU-Net itself.

- the archived MONet-Bundle format (configuration only in ``nnunet_config_ckpt``, unresolved ``@`` references,
  labels sorted by MONet's YAML round trip) with a multi-configuration plans file;
- scripted networks, built the way MONet builds them (``monet_bundle.script_like_monet``: the stock network cannot
  be scripted; see that module for the construction), on the fidelity cases;
- region-based models whose ``labels`` arrive sorted alphabetically are named by value;
- a clear error for what cannot run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("dynamic_network_architectures")

from monet_bundle import (  # noqa: E402
    archived_inference,
    multi_configuration_plans,
    script_like_monet,
    write_archived_monet,
)
from segmap.demo.phantom import make_phantom  # noqa: E402
from segmap_tools.plans import build_network, make_dataset_json, make_plans, write_nnunet_results_folder  # noqa: E402
from segmap.engine import EngineOptions, Segmenter  # noqa: E402
from segmap.errors import ModelError  # noqa: E402
from segmap.model import export_monet, load_model, parse_spec  # noqa: E402
from segmap.summary import describe_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning",
                                        "ignore:.*torch.jit.* is deprecated:DeprecationWarning")

CT_PROPS = {"mean": 80.0, "std": 250.0, "percentile_00_5": -150.0, "percentile_99_5": 1000.0}
LABELS = {"background": 0, "spleen": 1, "liver": 2, "bone": 3}
REGIONS = {"background": 0, "organs": [1, 2], "liver": [2], "bone": [3]}
BRATS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


def plans_for(**kw) -> dict:
    args = dict(patch_size=(24, 48, 48), spacing=(3.0, 1.5, 1.5), normalization_schemes=["CTNormalization"],
                intensity_properties=[CT_PROPS], features=(6, 12, 24))
    args.update(kw)
    return make_plans(**args)


def sorted_labels(dataset_json: dict) -> dict:
    """dataset.json as MONet's YAML dump leaves it: labels in alphabetical key order."""
    return {**dataset_json, "labels": dict(sorted(dataset_json["labels"].items()))}


def ct_case(shape=(32, 80, 80), spacing=(3.0, 1.5, 1.5), seed=5):
    return make_phantom(shape, spacing, seed=seed, extra_labels=True).hu[None].astype(np.float32), spacing


def assert_matches_nnunet(results: Path, folds: int, model_path: Path, image, spacing, *, min_dice=0.999):
    from nnunet_reference import dice_per_label, nnunet_predict

    reference = nnunet_predict(results, folds, image, spacing, mirroring=False)
    ours = Segmenter(load_model(model_path), EngineOptions(device="cpu")).predict(image, spacing)
    present = [v for v in np.unique(reference) if v and (reference == v).mean() >= 0.002]
    assert len(present) >= 2, f"too trivial to compare: {np.bincount(reference.ravel())}"
    dice = dice_per_label(reference, ours)
    assert all(dice[v] >= min_dice for v in present), dice
    print(f"Dice vs nnUNetPredictor: {dice}, labels present {present}")
    return dice


# ------------------------------------------------------------------------------------------- the archived format


@pytest.mark.fidelity
def test_archived_format_with_multi_configuration_plans_matches_nnunet(tmp_path, trained):
    pytest.importorskip("nnunetv2")
    plans = multi_configuration_plans(plans_for())
    ds = make_dataset_json(LABELS)
    state = trained(plans, 0, 4)
    results = write_nnunet_results_folder(tmp_path / "nnunet", plans, ds, [state])
    net = build_network(plans, "3d_fullres", 1, 4)
    net.load_state_dict(state)
    path = write_archived_monet(tmp_path / "monet" / "model.ts", script_like_monet(net), plans, sorted_labels(ds))

    model = load_model(path)
    assert model.spec.configuration == "3d_fullres"
    assert model.spec.patch_size == (24, 48, 48)  # not 3d_lowres' (12, 24, 24)
    assert model.spec.trainer_class_name == "nnUNetTrainer"  # "@nnunet_trainer_class_name" resolved
    assert model.spec.mirroring_axes == (0, 1, 2)
    assert model.spec.foreground_labels == [(1, "spleen"), (2, "liver"), (3, "bone")]
    image, spacing = ct_case()
    assert_matches_nnunet(results, 1, path, image, spacing)


def test_archived_format_without_a_configuration_names_the_keys(tmp_path):
    plans = multi_configuration_plans(plans_for())
    inference = archived_inference(plans, make_dataset_json(LABELS))
    del inference["nnunet_config_ckpt"]["configuration"]
    with pytest.raises(ModelError) as info:
        parse_spec(inference, {}, Path("m.ts"))
    message = str(info.value)
    assert "nnunet_config_ckpt.configuration" in message and "'2d', '3d_fullres', '3d_lowres'" in message


def test_configuration_given_as_a_reference_is_resolved():
    plans = multi_configuration_plans(plans_for())
    inference = archived_inference(plans, make_dataset_json(LABELS), configuration="@chosen")
    inference["chosen"] = "@nested#name"
    inference["nested"] = {"name": "3d_lowres"}
    spec = parse_spec(inference, {}, Path("m.ts"))
    assert spec.configuration == "3d_lowres" and spec.patch_size == (12, 24, 24)


@pytest.mark.parametrize("value, expected", [
    ("@missing", "refers to '@missing', which is not in the file"),
    ("$str('3d_fullres')", "is an expression"),
    ("@loop", "refers to itself"),
])
def test_unusable_references_are_refused(value, expected):
    inference = archived_inference(plans_for(), make_dataset_json(LABELS), configuration=value)
    inference["loop"] = "@loop"
    with pytest.raises(ModelError) as info:
        parse_spec(inference, {}, Path("m.ts"))
    assert expected in str(info.value) and "nnunet_config_ckpt#configuration" in str(info.value)


# ------------------------------------------------------------------------------------------------ region names


@pytest.mark.parametrize("labels, order, expected", [
    (BRATS, [1, 2, 3], [(1, "whole tumor"), (2, "tumor core"), (3, "enhancing tumor")]),
    (REGIONS, [1, 2, 3], [(1, "organs"), (2, "liver"), (3, "bone")]),
    # painted values need not be 1..N in key order: the pairing follows the values each region holds
    ({"background": 0, "b": [3], "a": [1, 2, 3]}, [1, 3], [(1, "a"), (3, "b")]),
], ids=["brats", "organs", "reversed"])
@pytest.mark.parametrize("key_order", ["original", "alphabetical"])
def test_region_labels_are_named_by_value_in_any_key_order(labels, order, expected, key_order):
    ds = make_dataset_json(labels, regions_class_order=order)
    if key_order == "alphabetical":
        ds = sorted_labels(ds)
        assert list(ds["labels"]) != list(labels) or labels is not BRATS
    inference = {"plans": plans_for(), "dataset_json": ds, "nnunet_configuration": "3d_fullres"}
    spec = parse_spec(inference, {}, Path("m.ts"))
    assert spec.foreground_labels == expected
    assert spec.num_outputs == len(order)


def test_alphabetical_brats_labels_in_the_model_summary(tmp_path):
    ds = sorted_labels(make_dataset_json(BRATS, regions_class_order=[1, 2, 3]))
    plans = plans_for(features=(4, 8))
    path = export_monet(tmp_path / "m.ts", build_network(plans, "3d_fullres", 1, 3), plans, ds, "3d_fullres")
    summary = describe_model(load_model(path))
    assert "1: whole tumor = [1, 2, 3]" in summary and "3: enhancing tumor = [3]" in summary
    assert "2: tumor core = [2, 3]" in summary


def test_regions_that_cannot_be_told_apart_are_refused():
    ds = sorted_labels(make_dataset_json({"background": 0, "y": [1, 2], "x": [1, 2]}, regions_class_order=[2, 1]))
    ds["labels"] = {"background": 0, "x": [1, 2], "y": [1, 2], "z": [3]}
    ds["regions_class_order"] = [3, 2, 1]  # z first: the key order (x, y, z) is not a valid pairing
    inference = {"plans": plans_for(), "dataset_json": ds, "nnunet_configuration": "3d_fullres"}
    with pytest.raises(ModelError) as info:
        parse_spec(inference, {}, Path("m.ts"))
    assert "cannot be paired with regions_class_order [3, 2, 1] unambiguously" in str(info.value)


def test_ignore_label_is_not_an_output():
    ds = make_dataset_json({"background": 0, "spleen": 1, "liver": 2, "ignore": 3})
    spec = parse_spec({"plans": plans_for(), "dataset_json": ds, "nnunet_configuration": "3d_fullres"}, {},
                      Path("m.ts"))
    assert spec.num_outputs == 3 and spec.foreground_labels == [(1, "spleen"), (2, "liver")]


# -------------------------------------------------------------------------------------------- scripted networks


@pytest.mark.fidelity
@pytest.mark.parametrize("case", ["ct", "transpose", "regions-alphabetical", "two-folds"])
def test_scripted_network_matches_nnunet(tmp_path, trained, case):
    pytest.importorskip("nnunetv2")
    plans, ds, folds, n_out = plans_for(), make_dataset_json(LABELS), 1, 4
    image, spacing = ct_case()
    if case == "transpose":  # network axes are (x, z, y) of the image
        plans = plans_for(transpose_forward=(2, 0, 1), spacing=(1.5, 3.0, 1.5), patch_size=(48, 24, 48))
        image, spacing = ct_case(shape=(30, 64, 56))
    elif case == "regions-alphabetical":
        ds, n_out = make_dataset_json(REGIONS, regions_class_order=[1, 2, 3]), 3
        image, spacing = ct_case(seed=13)
    elif case == "two-folds":
        folds = 2
        image, spacing = ct_case(seed=11)
    states = [trained(plans, k, n_out) for k in range(folds)]
    results = write_nnunet_results_folder(tmp_path / "nnunet", plans, ds, states)
    for k, state in enumerate(states):
        net = build_network(plans, "3d_fullres", 1, n_out)
        net.load_state_dict(state)
        scripted = script_like_monet(net)
        assert "Union" in str(scripted.forward.schema.returns[0].type)
        export_monet(tmp_path / "monet" / f"fold_{k}" / "model.ts", scripted, plans,
                     sorted_labels(ds) if case == "regions-alphabetical" else ds, "3d_fullres", fold=k)
    assert_matches_nnunet(results, folds, tmp_path / "monet", image, spacing)


def test_scripted_network_is_frozen_for_the_cpu_and_returns_logits(tmp_path):
    plans = plans_for(features=(4, 8), patch_size=(16, 16, 16))
    torch.manual_seed(0)
    net = build_network(plans, "3d_fullres", 1, 4).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = net(x)
    path = export_monet(tmp_path / "m.ts", script_like_monet(net), plans, make_dataset_json(LABELS), "3d_fullres")
    segmenter = Segmenter(load_model(path), EngineOptions(device="cpu", optimize=True))
    (network,) = segmenter.runner.candidates[0].networks  # optimize=True: the frozen/fused graph is the only path
    with torch.no_grad():
        got = network(x)
    assert isinstance(got, torch.Tensor) and float((got - expected).abs().max()) < 1e-4
    assert not list(network.parameters()), "the engine's freeze/fuse step did not apply to the scripted network"


def test_deep_supervision_output_is_reduced_to_full_resolution_logits(tmp_path):
    plans = plans_for(features=(4, 8), patch_size=(16, 16, 16))
    torch.manual_seed(0)
    net = build_network(plans, "3d_fullres", 1, 4).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = net(x)
    net.decoder.deep_supervision = True  # a network exported with deep supervision still on returns a list
    path = export_monet(tmp_path / "m.ts", script_like_monet(net), plans, make_dataset_json(LABELS), "3d_fullres")
    (network,) = load_model(path).load_networks("cpu")
    with torch.no_grad():
        got = network(x)
    assert isinstance(got, torch.Tensor) and torch.equal(got, expected)


# ------------------------------------------------------------------------------------------------- clear errors


def test_network_with_the_wrong_number_of_outputs_is_refused(tmp_path):
    plans = plans_for(features=(4, 8), patch_size=(16, 16, 16))
    path = export_monet(tmp_path / "m.ts", build_network(plans, "3d_fullres", 1, 3), plans,
                        make_dataset_json(LABELS), "3d_fullres")
    with pytest.raises(ModelError) as info:
        load_model(path).load_networks("cpu")
    assert str(path) in str(info.value) and "3 output channel(s) but dataset_json describes 4" in str(info.value)


def test_network_with_the_wrong_number_of_inputs_is_refused(tmp_path):
    plans = plans_for(features=(4, 8), patch_size=(16, 16, 16))
    net = build_network(plans, "3d_fullres", 2, 4)
    with torch.no_grad():
        traced = torch.jit.trace(net.eval(), torch.zeros(1, 2, 16, 16, 16), check_trace=False)
    path = export_monet(tmp_path / "m.ts", traced, plans, make_dataset_json(LABELS), "3d_fullres")
    with pytest.raises(ModelError) as info:
        load_model(path).load_networks("cpu")
    assert "takes 2 input channel(s)" in str(info.value) and "1 ['CT']" in str(info.value)


def test_module_that_does_not_return_a_tensor_is_refused(tmp_path):
    class Labels(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> int:
            return int(x.shape[1])

    plans = plans_for(features=(4, 8), patch_size=(16, 16, 16))
    path = export_monet(tmp_path / "m.ts", torch.jit.script(Labels()), plans, make_dataset_json(LABELS),
                        "3d_fullres")
    with pytest.raises(ModelError) as info:
        load_model(path).load_networks("cpu")
    assert "the network returns int; expected logits (Tensor)" in str(info.value)


def test_an_nnunet_checkpoint_given_as_the_model_points_to_its_results_folder(tmp_path):
    plans = plans_for(features=(4, 8), patch_size=(16, 16, 16))
    folder = write_nnunet_results_folder(tmp_path / "results", plans, make_dataset_json(LABELS),
                                         [build_network(plans, "3d_fullres", 1, 4).state_dict()])
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    with pytest.raises(ModelError) as info:
        load_model(checkpoint)
    assert str(info.value) == (f"{checkpoint}: a PyTorch checkpoint, not a TorchScript model.ts; for an nnU-Net "
                               "checkpoint give its results folder (plans.json, dataset.json, fold_K/) or convert it "
                               "with segmap convert")
    assert load_model(folder).source == "nnunet-results"
