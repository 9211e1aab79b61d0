"""Model files as MONet and nnU-Net users have them, for the format tests.

- :func:`script_like_monet`: MONet scripts the network (``torch.jit.script``) with its author's fork of
  dynamic-network-architectures, whose only changes to the plain U-Net are TorchScript-friendly ``forward``
  methods: the encoder always returns a list, the decoder is annotated ``Union[Tensor, List[Tensor]]`` and walks its
  ``ModuleList``s by iteration instead of by index. The stock package cannot be scripted (its encoder returns a
  list or a tensor); so the closest faithful construction available without the fork is the stock network with
  its encoder's and decoder's classes swapped for subclasses whose ``forward`` is written that way (same modules,
  same weights, same arithmetic), then scripted.
- :func:`write_archived_monet`: the archived MONet-Bundle format: ``inference.json`` is the bundle's inference
  config dumped through YAML (keys sorted, so ``dataset_json.labels`` is alphabetical), with no top-level
  ``nnunet_configuration``; ``nnunet_config_ckpt`` holds the configuration and an unresolved
  ``"@nnunet_trainer_class_name"`` reference.
- :func:`multi_configuration_plans`: plans holding ``2d``, ``3d_lowres`` and ``3d_fullres`` as every real nnU-Net
  plans file does.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import List, Mapping, Union

import torch
import yaml
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

from segmap.model import default_metadata


class ScriptableEncoder(PlainConvEncoder):
    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        skips: List[torch.Tensor] = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        if self.return_skips:
            return skips
        return [x]


class ScriptableDecoder(UNetDecoder):
    def forward(self, skips: List[torch.Tensor]) -> Union[torch.Tensor, List[torch.Tensor]]:
        x = skips[-1]
        outputs: List[torch.Tensor] = []
        last = len(self.stages) - 1
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), 1))
            for k, head in enumerate(self.seg_layers):
                if k == s and (self.deep_supervision or s == last):
                    outputs.append(head(x))
        if not self.deep_supervision:
            return outputs[-1]
        return outputs[::-1]


def script_like_monet(network) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of a stock PlainConvUNet made scriptable as MONet's fork makes it (see above)."""
    network.encoder.__class__ = ScriptableEncoder
    network.decoder.__class__ = ScriptableDecoder
    return torch.jit.script(network.eval())


def multi_configuration_plans(plans: Mapping) -> dict:
    """``plans`` with a ``2d`` and a ``3d_lowres`` configuration next to its ``3d_fullres`` (other patch sizes and
    spacings, so that using the wrong one would show)."""
    plans = copy.deepcopy(dict(plans))
    full = plans["configurations"]["3d_fullres"]
    two_d = copy.deepcopy(full)
    two_d.update(patch_size=list(full["patch_size"][1:]), spacing=list(full["spacing"][1:]),
                 data_identifier="nnUNetPlans_2d")
    arch = two_d["architecture"]["arch_kwargs"]
    arch.update(conv_op="torch.nn.modules.conv.Conv2d", norm_op="torch.nn.modules.instancenorm.InstanceNorm2d",
                kernel_sizes=[k[1:] for k in arch["kernel_sizes"]], strides=[s[1:] for s in arch["strides"]])
    low = copy.deepcopy(full)
    low.update(spacing=[2 * s for s in full["spacing"]], data_identifier="nnUNetPlans_3d_lowres",
               patch_size=[max(8, p // 2) for p in full["patch_size"]], next_stage="3d_cascade_fullres")
    plans["configurations"] = {"2d": two_d, "3d_lowres": low, "3d_fullres": full}
    return plans


def _yaml_round_trip(value):
    """What MONet's conversion does to its config: ``yaml.dump`` (sorted keys) then ``yaml.safe_load``."""
    return yaml.safe_load(yaml.dump(value))


def archived_inference(plans: Mapping, dataset_json: Mapping, *, configuration: str = "3d_fullres",
                       trainer: str = "nnUNetTrainer") -> dict:
    """``inference.json`` of the archived MONet-Bundle format (see the module docstring)."""
    config = {
        "bundle_root": ".",
        "fold_id": 0,
        "model_name": "model.pt",
        "device": "$torch.device('cuda')",
        "nnunet_trainer_class_name": trainer,
        "nnunet_config_ckpt": {"trainer_name": "@nnunet_trainer_class_name",
                               "inference_allowed_mirroring_axes": [0, 1, 2], "configuration": configuration},
        "nnunet_config_dict": {"model_folder": "$@bundle_root + '/models/fold_'+str(@fold_id)",
                               "model_name": "@model_name", "nnunet_config": "@nnunet_config_ckpt",
                               "plans": "@plans", "dataset_json": "@dataset_json"},
        "network_def": "$monai.apps.nnunet.nnunet_bundle.get_nnunet_monai_predictor(**@nnunet_config_dict)",
        "network_def_predictor": "$@network_def.network_weights",
        "plans": dict(plans),
        "dataset_json": dict(dataset_json),
    }
    return _yaml_round_trip(config)


def write_archived_monet(path: Path, module: torch.jit.ScriptModule, plans: Mapping, dataset_json: Mapping,
                         **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    inference = archived_inference(plans, dataset_json, **kw)
    assert "nnunet_configuration" not in inference
    torch.jit.save(module, str(path), _extra_files={
        "inference.json": json.dumps(inference), "metadata.json": json.dumps(default_metadata(dataset_json))})
    return path
