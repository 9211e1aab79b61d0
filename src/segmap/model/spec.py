"""What a model declares: nnU-Net's plans and labels read into a :class:`ModelSpec`.

Both readers (:mod:`.monet` for MONet model.ts files, :mod:`.nnunet_results` for nnU-Net results folders) hand
their documents to :func:`parse_spec`. ``inference.json`` may be in MONet's current format (top-level
``nnunet_configuration``) or the archived one, where the configuration is only in
``nnunet_config_ckpt.configuration``; ``nnunet_config_ckpt`` values may be unresolved MONAI-bundle references
(``"@nnunet_configuration"``), which are resolved against ``inference.json`` the way MONAI's ``ConfigParser``
would. ``dataset_json.labels`` may come in any key order: MONet's YAML round trip sorts it alphabetically, so
region names are paired with ``regions_class_order`` values by the values each region holds, never by dict
position.

All per-axis values in :class:`ModelSpec` are in nnU-Net's transposed ("network") axis order, exactly as the
plans store them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ModelError

log = logging.getLogger("segmap.model")

INFERENCE_JSON = "inference.json"
METADATA_JSON = "metadata.json"
#: nnU-Net's name for the label that marks unannotated voxels; it is not a network output.
IGNORE_LABEL = "ignore"

#: nnU-Net's resampling functions whose behaviour the engine reproduces.
SUPPORTED_RESAMPLING = ("resample_data_or_seg_to_shape",)
SUPPORTED_NORMALIZATION = (
    "CTNormalization",
    "ZScoreNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
    "RGBTo01Normalization",
)


@dataclass(frozen=True)
class ResamplingSpec:
    """How nnU-Net resamples one kind of array (image data or logits)."""

    order: int
    order_z: int = 0
    force_separate_z: bool | None = None
    separate_z_anisotropy_threshold: float = 3.0


@dataclass(frozen=True)
class ChannelNormalization:
    """The intensity normalisation nnU-Net applies to one input channel."""

    scheme: str
    use_mask_for_norm: bool = False
    #: ``foreground_intensity_properties_per_channel[c]``: mean, std, percentile_00_5, percentile_99_5, ...
    intensity_properties: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """Everything inference needs to know about a model, read from its embedded plans."""

    configuration: str
    #: Patch (tile) size of the network, voxels, network axis order.
    patch_size: tuple[int, ...]
    #: Target spacing in mm, network axis order.
    target_spacing: tuple[float, ...]
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    normalization: tuple[ChannelNormalization, ...]
    #: dataset.json ``channel_names`` values in channel order (e.g. ``("CT",)``).
    channel_names: tuple[str, ...]
    #: The model's input names from metadata.json (the task file's modality keys), in channel order.
    input_names: tuple[str, ...]
    #: dataset.json ``labels``: name -> int, or name -> list of ints for region-based models.
    labels: Mapping[str, Any]
    regions_class_order: tuple[int, ...] | None
    #: Axes (network order, 0-based) nnU-Net allows mirroring along at test time; empty means none.
    mirroring_axes: tuple[int, ...]
    data_resampling: ResamplingSpec
    probabilities_resampling: ResamplingSpec
    trainer_class_name: str = "nnUNetTrainer"
    metadata: Mapping[str, Any] = field(default_factory=dict)
    #: For region-based models: the region name behind each network output channel (``regions_class_order``
    #: position), paired by value (see :func:`pair_region_names`).
    region_names: tuple[str, ...] = ()

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def has_regions(self) -> bool:
        return self.regions_class_order is not None

    @property
    def num_outputs(self) -> int:
        """Number of network output channels (nnU-Net's segmentation heads; the ignore label is not one)."""
        if self.has_regions:
            return len(self.regions_class_order)
        return len([n for n in self.labels if n != IGNORE_LABEL])

    @property
    def foreground_labels(self) -> list[tuple[int, str]]:
        """(value in the output label map, label name), sorted by value, background and ignore label excluded."""
        if self.has_regions:
            return sorted((int(v), n) for v, n in zip(self.regions_class_order, self.region_names))
        return sorted((int(v), n) for n, v in self.labels.items() if n != IGNORE_LABEL and int(v) != 0)


def _region_values(v: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)


def pair_region_names(labels: Mapping[str, Any], regions_class_order: Sequence[int], path: Path) -> tuple[str, ...]:
    """The region name of each network output channel of a region-based model.

    nnU-Net trains output channel ``i`` on the ``i``-th foreground region of ``dataset.json``'s ``labels`` *in the
    file's key order* and paints it with ``regions_class_order[i]``. MONet's YAML round trip sorts the keys
    alphabetically, so the position is lost; what survives is that the painted value is one of the label values the
    region unites (BraTS: whole tumour [1, 2, 3] is painted 1, tumour core [2, 3] 2, enhancing [3] 3). The names are
    therefore matched to channels by value: the one assignment in which every channel's painted value belongs to its
    region. Several such assignments: the key order is kept if it is one of them (it cannot be told apart), otherwise
    the model is refused. None: the key order is all there is (logged when the keys look sorted).
    """
    regions = [(n, set(_region_values(v))) for n, v in labels.items()
               if n != IGNORE_LABEL and _region_values(v) != (0,)]
    values = [int(v) for v in regions_class_order]
    where = f"{path}: dataset_json"
    if len(regions) != len(values):
        raise ModelError(f"{where} has {len(regions)} foreground regions {[n for n, _ in regions]} but "
                         f"regions_class_order has {len(values)} values {values}")
    names = [n for n, _ in regions]
    in_key_order = all(v in s for v, (_, s) in zip(values, regions))
    found: list[tuple[str, ...]] = []

    def assign(i: int, used: tuple[str, ...]) -> None:
        if len(found) > 1:
            return
        if i == len(values):
            found.append(used)
            return
        for name, members in regions:
            if name not in used and values[i] in members:
                assign(i + 1, used + (name,))

    assign(0, ())
    if len(found) == 1:
        return found[0]
    if in_key_order:
        return tuple(names)
    if found:
        raise ModelError(f"{where} regions {dict((n, sorted(s)) for n, s in regions)} cannot be paired with "
                         f"regions_class_order {values} unambiguously (several regions hold the same values)")
    if names == sorted(names):
        log.warning("%s: region names could not be paired with regions_class_order %s by value; using the "
                    "labels' key order, which looks alphabetical", path, values)
    return tuple(names)


def _as_dict(value: Any, path: Path, key: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}: inference.json key '{key}' holds a string that is not JSON ({e})") from e
    if not isinstance(value, dict):
        raise ModelError(f"{path}: inference.json key '{key}' must be an object, got {type(value).__name__}")
    return value


def _require(mapping: Mapping, key: str, path: Path, where: str) -> Any:
    if key not in mapping:
        raise ModelError(f"{path}: {where} has no '{key}'")
    return mapping[key]


def _resampling_spec(config: Mapping, kind: str, path: Path) -> ResamplingSpec:
    fn = config.get(f"resampling_fn_{kind}", "resample_data_or_seg_to_shape")
    if fn not in SUPPORTED_RESAMPLING:
        raise ModelError(
            f"{path}: plans use resampling function '{fn}' for {kind}; segmap supports {', '.join(SUPPORTED_RESAMPLING)}"
        )
    kw = dict(config.get(f"resampling_fn_{kind}_kwargs") or {})
    default_order = 3 if kind == "data" else 1
    return ResamplingSpec(
        order=int(kw.get("order", default_order)),
        order_z=int(kw.get("order_z", 0)),
        force_separate_z=kw.get("force_separate_z"),
        separate_z_anisotropy_threshold=float(kw.get("separate_z_anisotropy_threshold", 3.0)),
    )


_UNRESOLVED = object()


def resolve_reference(value: Any, document: Mapping[str, Any], path: Path, key: str, _seen: tuple = ()) -> Any:
    """``value`` with MONAI-bundle references (``"@id"``, ``"@a#b"`` for nested ids) replaced by what they point to
    in ``document``, recursively; an expression (``"$..."``) cannot be evaluated here and raises."""
    if isinstance(value, str) and value.startswith("@"):
        ref = value[1:]
        if ref in _seen:
            raise ModelError(f"{path}: inference.json key '{key}' refers to itself through {' -> '.join(_seen)}")
        target: Any = document
        for part in ref.split("#"):
            if isinstance(target, Mapping) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise ModelError(f"{path}: inference.json key '{key}' refers to '{value}', which is not in the file")
        return resolve_reference(target, document, path, key, _seen + (ref,))
    if isinstance(value, str) and value.startswith("$"):
        raise ModelError(f"{path}: inference.json key '{key}' is an expression ({value[:60]}); segmap needs a value")
    if isinstance(value, Mapping):
        return {k: resolve_reference(v, document, path, f"{key}#{k}", _seen) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_reference(v, document, path, f"{key}#{i}", _seen) for i, v in enumerate(value)]
    return value


def _config_ckpt(inference: Mapping[str, Any], path: Path) -> dict:
    """``nnunet_config_ckpt`` (what MONet passes to MONAI's nnU-Net predictor as ``nnunet_config``), resolved."""
    ckpt = inference.get("nnunet_config_ckpt") or {}
    if isinstance(ckpt, str) and not ckpt.startswith(("@", "$")):
        ckpt = _as_dict(ckpt, path, "nnunet_config_ckpt")
    ckpt = resolve_reference(ckpt, inference, path, "nnunet_config_ckpt")
    if not isinstance(ckpt, Mapping):
        raise ModelError(f"{path}: inference.json key 'nnunet_config_ckpt' must be an object, "
                         f"got {type(ckpt).__name__}")
    return dict(ckpt)


def _configuration(inference: Mapping[str, Any], ckpt: Mapping[str, Any], configs: Mapping, path: Path) -> str:
    """The nnU-Net configuration: ``nnunet_configuration`` (current MONet format), else
    ``nnunet_config_ckpt.configuration`` (archived format) or its ``init_args.configuration`` (an nnU-Net
    checkpoint's layout), else the plans' only configuration."""
    candidates = [("nnunet_configuration", inference.get("nnunet_configuration")),
                  ("nnunet_config_ckpt#configuration", ckpt.get("configuration")),
                  ("nnunet_config_ckpt#init_args#configuration", (ckpt.get("init_args") or {}).get("configuration"))]
    for key, value in candidates:
        if value is None:
            continue
        value = resolve_reference(value, inference, path, key)
        if not isinstance(value, str):
            raise ModelError(f"{path}: inference.json key '{key}' must be a configuration name, got {value!r}")
        return value
    if len(configs) != 1:
        raise ModelError(f"{path}: inference.json names no configuration (neither 'nnunet_configuration' nor "
                         f"'nnunet_config_ckpt.configuration') and plans hold {sorted(configs)}")
    return next(iter(configs))


def resolved_configuration(plans: Mapping, configuration: str, path: Path) -> dict:
    """The plans' ``configuration`` with what it ``inherits_from`` filled in (nnU-Net's cascade and custom
    configurations inherit from another one)."""
    configs = plans["configurations"]
    if configuration not in configs:
        raise ModelError(
            f"{path}: configuration '{configuration}' is not in the plans (found: {', '.join(sorted(configs))})")
    config = dict(configs[configuration])
    seen = {configuration}
    while "inherits_from" in config:
        parent = config.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise ModelError(f"{path}: configuration '{configuration}' inherits from unknown '{parent}'")
        seen.add(parent)
        config = {**configs[parent], **config}
    return config


def parse_spec(inference: Mapping[str, Any], metadata: Mapping[str, Any], path: Path) -> ModelSpec:
    """Build a :class:`ModelSpec` from the embedded JSON documents, with errors naming the missing key."""
    path = Path(path)
    plans = _as_dict(resolve_reference(_require(inference, "plans", path, "inference.json"), inference, path,
                                       "plans"), path, "plans")
    dataset = _as_dict(resolve_reference(_require(inference, "dataset_json", path, "inference.json"), inference,
                                         path, "dataset_json"), path, "dataset_json")
    configs = _require(plans, "configurations", path, "plans")
    ckpt = _config_ckpt(inference, path)
    configuration = _configuration(inference, ckpt, configs, path)
    config = resolved_configuration(plans, configuration, path)
    where = f"plans configuration '{configuration}'"
    patch_size = tuple(int(v) for v in _require(config, "patch_size", path, where))
    spacing = tuple(float(v) for v in _require(config, "spacing", path, where))
    if len(patch_size) != 3 or len(spacing) != 3:
        raise ModelError(f"{path}: {where} is {len(patch_size)}D; segmap runs 3D configurations only")

    channel_map = _require(dataset, "channel_names", path, "dataset_json")
    channel_names = tuple(str(channel_map[k]) for k in sorted(channel_map, key=lambda k: int(k)))
    labels = dict(_require(dataset, "labels", path, "dataset_json"))
    regions = dataset.get("regions_class_order")
    if any(isinstance(v, (list, tuple)) for v in labels.values()) and regions is None:
        raise ModelError(f"{path}: dataset_json labels are regions but 'regions_class_order' is missing")
    region_names = pair_region_names(labels, regions, path) if regions is not None else ()
    trainer = inference.get("nnunet_trainer_class_name", ckpt.get("trainer_name", "nnUNetTrainer"))
    trainer = resolve_reference(trainer, inference, path, "nnunet_trainer_class_name")

    schemes = list(_require(config, "normalization_schemes", path, where))
    if len(schemes) != len(channel_names):
        raise ModelError(
            f"{path}: {where} has {len(schemes)} normalization_schemes for {len(channel_names)} channels"
        )
    use_mask = list(config.get("use_mask_for_norm") or [False] * len(schemes))
    props = plans.get("foreground_intensity_properties_per_channel", {})
    normalization = []
    for c, scheme in enumerate(schemes):
        if scheme not in SUPPORTED_NORMALIZATION:
            raise ModelError(
                f"{path}: channel {c} uses normalization '{scheme}'; supported: {', '.join(SUPPORTED_NORMALIZATION)}"
            )
        p = props.get(str(c), {})
        if scheme == "CTNormalization":
            missing = [k for k in ("mean", "std", "percentile_00_5", "percentile_99_5") if k not in p]
            if missing:
                raise ModelError(
                    f"{path}: CTNormalization of channel {c} needs foreground_intensity_properties_per_channel"
                    f"['{c}'] keys {missing}"
                )
        normalization.append(ChannelNormalization(scheme, bool(use_mask[c]), dict(p)))

    mirroring = ckpt.get("inference_allowed_mirroring_axes")

    transpose_forward = tuple(int(v) for v in plans.get("transpose_forward", (0, 1, 2)))
    transpose_backward = tuple(int(v) for v in plans.get("transpose_backward", (0, 1, 2)))
    if sorted(transpose_forward) != [0, 1, 2] or sorted(transpose_backward) != [0, 1, 2]:
        raise ModelError(f"{path}: plans transpose_forward/backward must be permutations of 0, 1, 2")

    inputs = (metadata.get("network_data_format") or {}).get("inputs") or {}
    input_names = tuple(inputs) if len(inputs) == len(channel_names) else ()
    if not input_names:
        input_names = ("image",) if len(channel_names) == 1 else channel_names

    return ModelSpec(
        configuration=configuration,
        patch_size=patch_size,
        target_spacing=spacing,
        transpose_forward=transpose_forward,
        transpose_backward=transpose_backward,
        normalization=tuple(normalization),
        channel_names=channel_names,
        input_names=input_names,
        labels=labels,
        regions_class_order=tuple(int(v) for v in regions) if regions is not None else None,
        mirroring_axes=tuple(int(a) for a in mirroring) if mirroring else (),
        data_resampling=_resampling_spec(config, "data", path),
        probabilities_resampling=_resampling_spec(config, "probabilities", path),
        trainer_class_name=str(trainer),
        metadata=dict(metadata),
        region_names=region_names,
    )
