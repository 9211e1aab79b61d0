"""nnU-Net v2 plans and dataset.json documents for small PlainConvUNet networks.

The documents follow nnU-Net v2's schema closely enough that ``nnUNetPredictor`` loads them from a results folder
(``plans.json``, ``dataset.json``, ``fold_K/checkpoint_final.pth``), which is how the fidelity tests compare
segmap with nnU-Net itself.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Mapping, Sequence

ARCH_CLASS = "dynamic_network_architectures.architectures.unet.PlainConvUNet"


def make_dataset_json(labels: Mapping[str, int | list], channel_names: Sequence[str] = ("CT",),
                      regions_class_order: Sequence[int] | None = None, name: str = "Dataset999_Segmap") -> dict:
    ds = {
        "name": name,
        "channel_names": {str(i): c for i, c in enumerate(channel_names)},
        "labels": dict(labels),
        "numTraining": 0,
        "file_ending": ".nii.gz",
    }
    if regions_class_order is not None:
        ds["regions_class_order"] = list(regions_class_order)
    return ds


def make_plans(*, patch_size: Sequence[int], spacing: Sequence[float], normalization_schemes: Sequence[str],
               intensity_properties: Sequence[Mapping[str, float]] | None = None,
               use_mask_for_norm: Sequence[bool] | None = None, features: Sequence[int] = (8, 16, 32),
               strides: Sequence[Sequence[int]] | None = None, transpose_forward: Sequence[int] = (0, 1, 2),
               configuration: str = "3d_fullres", dataset_name: str = "Dataset999_Segmap") -> dict:
    """A plans document with one 3D configuration of a PlainConvUNet (values in transposed order)."""
    n = len(features)
    if strides is None:
        strides = [[1, 1, 1]] + [[2, 2, 2]] * (n - 1)
    channels = len(normalization_schemes)
    if intensity_properties is None:
        intensity_properties = [{"mean": 0.0, "std": 1.0, "percentile_00_5": -1e9, "percentile_99_5": 1e9,
                                 "median": 0.0, "min": -1e9, "max": 1e9}] * channels
    transpose_backward = [list(transpose_forward).index(i) for i in range(3)]
    config = {
        "data_identifier": f"nnUNetPlans_{configuration}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [int(v) for v in patch_size],
        "median_image_size_in_voxels": [int(v) for v in patch_size],
        "spacing": [float(v) for v in spacing],
        "normalization_schemes": list(normalization_schemes),
        "use_mask_for_norm": list(use_mask_for_norm) if use_mask_for_norm is not None else [False] * channels,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {
            "network_class_name": ARCH_CLASS,
            "arch_kwargs": {
                "n_stages": n,
                "features_per_stage": list(features),
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3]] * n,
                "strides": [list(s) for s in strides],
                "n_conv_per_stage": [2] * n,
                "n_conv_per_stage_decoder": [2] * (n - 1),
                "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [float(v) for v in spacing],
        "original_median_shape_after_transp": [int(v) for v in patch_size],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose_forward),
        "transpose_backward": transpose_backward,
        "configurations": {configuration: config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {str(c): dict(p) for c, p in enumerate(intensity_properties)},
    }


def build_network(plans: Mapping, configuration: str, num_input_channels: int, num_outputs: int):
    """Instantiate the plans' PlainConvUNet with deep supervision off (needs dynamic-network-architectures)."""
    import pydoc

    import torch  # noqa: F401  (the pydoc lookups below import torch.nn modules)
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    arch = copy.deepcopy(plans["configurations"][configuration]["architecture"])
    kwargs = arch["arch_kwargs"]
    for key in arch["_kw_requires_import"]:
        if kwargs.get(key) is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    return PlainConvUNet(input_channels=num_input_channels, num_classes=num_outputs, deep_supervision=False,
                         **kwargs)


def write_nnunet_results_folder(folder: Path, plans: Mapping, dataset_json: Mapping, fold_state_dicts: Sequence,
                                configuration: str = "3d_fullres", mirroring_axes: Sequence[int] | None = (0, 1, 2),
                                trainer_name: str = "nnUNetTrainer") -> Path:
    """Write the layout ``nnUNetPredictor.initialize_from_trained_model_folder`` reads."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    for k, state in enumerate(fold_state_dicts):
        (folder / f"fold_{k}").mkdir(exist_ok=True)
        torch.save({
            "network_weights": state,
            "trainer_name": trainer_name,
            "init_args": {"configuration": configuration, "fold": k, "plans": dict(plans),
                          "dataset_json": dict(dataset_json)},
            "inference_allowed_mirroring_axes": tuple(mirroring_axes) if mirroring_axes is not None else None,
        }, folder / f"fold_{k}" / "checkpoint_final.pth")
    return folder
