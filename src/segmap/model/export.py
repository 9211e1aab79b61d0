"""Writing MONet model files: the ``inference.json`` and ``metadata.json`` documents, and the archive itself.

torch is imported only where a network is saved or traced, so that building the documents stays cheap.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from .spec import IGNORE_LABEL, INFERENCE_JSON, METADATA_JSON, pair_region_names, resolved_configuration


def output_channel_def(dataset_json: Mapping[str, Any]) -> dict[str, str]:
    """``{label value: name}`` of the output label map (MONAI's ``channel_def``), regions paired by value."""
    labels = dataset_json["labels"]
    regions = dataset_json.get("regions_class_order")
    if regions is not None:
        names = pair_region_names(labels, regions, Path("dataset.json"))
        pairs = [(0, "background")] + sorted(zip((int(v) for v in regions), names))
    else:
        pairs = sorted((int(v), n) for n, v in labels.items() if n != IGNORE_LABEL)
    return {str(v): n for v, n in pairs}


def default_metadata(dataset_json: Mapping[str, Any], *, name: str = "", description: str = "",
                     input_names: Sequence[str] | None = None) -> dict:
    """MONAI-bundle style metadata.json for an exported model."""
    channels = [dataset_json["channel_names"][k] for k in sorted(dataset_json["channel_names"], key=int)]
    if input_names is None:
        input_names = ["image"] if len(channels) == 1 else channels
    return {
        "version": "0.1.0",
        "task": name,
        "description": description,
        "network_data_format": {
            "inputs": {
                n: {"type": "image", "format": "magnitude", "modality": ch, "num_channels": 1,
                    "channel_def": {"0": ch}}
                for n, ch in zip(input_names, channels)
            },
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 1,
                                 "channel_def": output_channel_def(dataset_json)}},
        },
    }


#: The device entry of MONet's bundle config: an expression MONAI's ConfigParser evaluates when MONet's tools build
#: their predictor (segmap never evaluates it).
MONET_DEVICE_EXPRESSION = "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')"


def monet_inference_document(plans: Mapping, dataset_json: Mapping, configuration: str, *,
                             trainer_class_name: str = "nnUNetTrainer",
                             mirroring_axes: Sequence[int] | None = (0, 1, 2), fold: int | str = 0,
                             checkpoint_name: str = "model.pt") -> dict:
    """The ``inference.json`` MONet's current format embeds, with the keys its tools read.

    MONet's inference (``MONet_local_inference``, the MAIA MAPs) loads the file with ``torch.jit.load(...,
    _extra_files={"inference.json": "", "metadata.json": ""})``, builds MONAI's nnU-Net predictor from
    ``network_def`` through MONAI's ``ConfigParser`` (``nnunet_config_dict`` -> ``nnunet_config`` ->
    ``nnunet_config_ckpt`` with ``trainer_name``, ``configuration``, ``inference_allowed_mirroring_axes``; ``plans``,
    ``dataset_json``) and swaps the loaded TorchScript network in. The references stay unresolved, as MONet writes
    them.
    """
    return {
        "bundle_root": ".",
        "fold_id": fold if isinstance(fold, str) and not str(fold).isdigit() else int(fold),
        "model_name": checkpoint_name,
        "device": MONET_DEVICE_EXPRESSION,
        "nnunet_trainer_class_name": trainer_class_name,
        "nnunet_configuration": configuration,
        "plans": dict(plans),
        "dataset_json": dict(dataset_json),
        "nnunet_config_ckpt": {
            "trainer_name": "@nnunet_trainer_class_name",
            "configuration": "@nnunet_configuration",
            "inference_allowed_mirroring_axes": list(mirroring_axes) if mirroring_axes is not None else None,
        },
        "nnunet_config_dict": {
            "model_folder": "$@bundle_root + '/models/fold_' + str(@fold_id)",
            "model_name": "@model_name",
            "nnunet_config": "@nnunet_config_ckpt",
            "plans": "@plans",
            "dataset_json": "@dataset_json",
        },
        "network_def": "$monai.apps.nnunet.nnunet_bundle.get_nnunet_monai_predictor(**@nnunet_config_dict)",
        "network_def_predictor": "$@network_def.network_weights",
    }


def save_monet(path: str | Path, module, inference: Mapping, metadata: Mapping) -> Path:
    """Write a TorchScript ``module`` with ``inference.json`` and ``metadata.json`` embedded, atomically (a
    half-written model.ts never appears under its final name)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=DeprecationWarning)
        torch.jit.save(module, str(tmp), _extra_files={
            INFERENCE_JSON: json.dumps(inference, indent=1), METADATA_JSON: json.dumps(metadata, indent=1)})
    os.replace(tmp, path)
    return path


def export_monet(path: str | Path, network, plans: Mapping, dataset_json: Mapping, configuration: str, *,
                 trainer_class_name: str = "nnUNetTrainer", mirroring_axes: Sequence[int] | None = (0, 1, 2),
                 metadata: Mapping | None = None, fold: int | str = 0, checkpoint_name: str = "model.pt") -> Path:
    """Save ``network`` (deep supervision off) as a MONet model.ts with the plans embedded, in MONet's current
    format. A plain module is traced on one patch of zeros; a TorchScript module (e.g. scripted, as MONet does)
    is saved as it is."""
    import torch

    if isinstance(network, torch.jit.ScriptModule):
        module = network
    else:
        patch = resolved_configuration(plans, configuration, Path(path))["patch_size"]
        n_in = len(dataset_json["channel_names"])
        network = network.eval()
        with torch.no_grad():
            module = torch.jit.trace(network, torch.zeros(1, n_in, *patch), check_trace=False)
    inference = monet_inference_document(plans, dataset_json, configuration, trainer_class_name=trainer_class_name,
                                         mirroring_axes=mirroring_axes, fold=fold, checkpoint_name=checkpoint_name)
    meta = dict(metadata) if metadata is not None else default_metadata(dataset_json)
    return save_monet(path, module, inference, meta)
