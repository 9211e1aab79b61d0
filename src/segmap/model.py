"""MONet Bundle model files: TorchScript nnU-Net networks with nnU-Net's plans embedded.

A ``model.ts`` is a TorchScript archive of the bare network (deep supervision off). It carries two extra files,
``inference.json`` (nnU-Net's ``plans``, ``dataset_json``, ``nnunet_configuration``, ...) and ``metadata.json``
(MONAI bundle metadata). A directory holding ``fold_K/model.ts`` files is an ensemble of folds.

The embedded files are read straight from the zip archive, so inspecting or validating a model never
deserialises its weights; :meth:`MonetModel.load_networks` does that when inference needs them.

All per-axis values in :class:`ModelSpec` are in nnU-Net's transposed ("network") axis order, exactly as the
plans store them.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import ModelError

INFERENCE_JSON = "inference.json"
METADATA_JSON = "metadata.json"

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

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def has_regions(self) -> bool:
        return self.regions_class_order is not None

    @property
    def num_outputs(self) -> int:
        """Number of network output channels (nnU-Net's segmentation heads)."""
        if self.has_regions:
            return len(self.regions_class_order)
        return len(self.labels)

    @property
    def foreground_labels(self) -> list[tuple[int, str]]:
        """(value in the output label map, label name), sorted by value, background excluded."""
        if self.has_regions:
            names = [n for n, v in self.labels.items() if _region_values(v) != (0,)]
            return [(int(v), n) for v, n in zip(self.regions_class_order, names)]
        return sorted((int(v), n) for n, v in self.labels.items() if int(v) != 0)


def _region_values(v: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)


@dataclass
class MonetModel:
    """One MONet model: a single ``model.ts`` or several folds sharing the same plans."""

    path: Path
    fold_files: list[Path]
    spec: ModelSpec
    inference: Mapping[str, Any]

    @property
    def num_folds(self) -> int:
        return len(self.fold_files)

    def load_networks(self, device: str) -> list:
        """Deserialise every fold's TorchScript network onto ``device``, in eval mode."""
        import torch

        networks = []
        for f in self.fold_files:
            try:
                net = torch.jit.load(str(f), map_location=device)
            except Exception as e:  # torch raises RuntimeError subclasses with long C++ traces
                raise ModelError(f"{f}: cannot load the TorchScript network ({_first_line(e)})") from e
            net.eval()
            networks.append(net)
        return networks


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def read_extra_files(path: Path) -> dict[str, dict]:
    """The embedded ``inference.json`` and ``metadata.json`` of one model.ts, parsed, without loading weights."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            found: dict[str, dict] = {}
            for wanted in (INFERENCE_JSON, METADATA_JSON):
                member = next((n for n in names if n.endswith("/extra/" + wanted)), None)
                if member is None:
                    continue
                raw = zf.read(member)
                try:
                    found[wanted] = json.loads(raw) if raw.strip() else {}
                except json.JSONDecodeError as e:
                    raise ModelError(f"{path}: embedded {wanted} is not valid JSON ({e})") from e
    except zipfile.BadZipFile as e:
        raise ModelError(f"{path}: not a TorchScript model archive (the file is corrupt or not a model.ts)") from e
    except OSError as e:
        raise ModelError(f"{path}: cannot read the model file ({e})") from e
    if not any(n.endswith("/data.pkl") or n.endswith("/constants.pkl") for n in names):
        raise ModelError(f"{path}: the archive holds no TorchScript module (expected a MONet model.ts)")
    if not found.get(INFERENCE_JSON):
        raise ModelError(
            f"{path}: no embedded inference.json with nnU-Net plans; export the model in the MONet format "
            f"(torch.jit.save(..., _extra_files={{'inference.json': ..., 'metadata.json': ...}}))"
        )
    found.setdefault(METADATA_JSON, {})
    return found


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


def parse_spec(inference: Mapping[str, Any], metadata: Mapping[str, Any], path: Path) -> ModelSpec:
    """Build a :class:`ModelSpec` from the embedded JSON documents, with errors naming the missing key."""
    path = Path(path)
    plans = _as_dict(_require(inference, "plans", path, "inference.json"), path, "plans")
    dataset = _as_dict(_require(inference, "dataset_json", path, "inference.json"), path, "dataset_json")
    configs = _require(plans, "configurations", path, "plans")
    configuration = inference.get("nnunet_configuration")
    if configuration is None:
        if len(configs) != 1:
            raise ModelError(f"{path}: inference.json has no 'nnunet_configuration' and plans hold {sorted(configs)}")
        configuration = next(iter(configs))
    if configuration not in configs:
        raise ModelError(
            f"{path}: configuration '{configuration}' is not in the plans (found: {', '.join(sorted(configs))})"
        )
    config = dict(configs[configuration])
    # nnU-Net lets a configuration inherit from another one.
    seen = {configuration}
    while "inherits_from" in config:
        parent = config.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise ModelError(f"{path}: configuration '{configuration}' inherits from unknown '{parent}'")
        seen.add(parent)
        config = {**configs[parent], **config}
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

    ckpt = inference.get("nnunet_config_ckpt") or {}
    if isinstance(ckpt, str):
        ckpt = _as_dict(ckpt, path, "nnunet_config_ckpt")
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
        trainer_class_name=str(inference.get("nnunet_trainer_class_name", "nnUNetTrainer")),
        metadata=dict(metadata),
    )


FOLD_DIR = re.compile(r"^fold_(\d+|all)$")


def find_fold_files(path: Path) -> list[Path]:
    """The model.ts files behind ``path``: the file itself, or every ``fold_K/model.ts`` of a directory."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ModelError(f"{path}: model not found (expected a model.ts file or a folder of fold_K/model.ts)")
    folds = [d / "model.ts" for d in path.iterdir() if FOLD_DIR.match(d.name) and (d / "model.ts").is_file()]
    folds.sort(key=lambda f: (f.parent.name == "fold_all", int(f.parent.name[5:]) if f.parent.name != "fold_all" else 0))
    if folds:
        return folds
    if (path / "model.ts").is_file():
        return [path / "model.ts"]
    raise ModelError(f"{path}: folder holds neither model.ts nor fold_K/model.ts files")


def load_model(path: str | Path) -> MonetModel:
    """Open a model.ts (or a folder of folds) and read its plans; weights are loaded later, on demand."""
    path = Path(path)
    files = find_fold_files(path)
    first = read_extra_files(files[0])
    spec = parse_spec(first[INFERENCE_JSON], first[METADATA_JSON], files[0])
    for f in files[1:]:
        other = read_extra_files(f)
        if (other[INFERENCE_JSON].get("plans"), other[INFERENCE_JSON].get("dataset_json")) != (
            first[INFERENCE_JSON].get("plans"),
            first[INFERENCE_JSON].get("dataset_json"),
        ):
            raise ModelError(f"{f}: plans or dataset_json differ from {files[0]}; folds of one ensemble must share them")
    return MonetModel(path=path, fold_files=files, spec=spec, inference=first[INFERENCE_JSON])


def default_metadata(dataset_json: Mapping[str, Any], *, name: str = "", description: str = "",
                     input_names: Sequence[str] | None = None) -> dict:
    """MONAI-bundle style metadata.json for an exported model."""
    channels = [dataset_json["channel_names"][k] for k in sorted(dataset_json["channel_names"], key=int)]
    if input_names is None:
        input_names = ["image"] if len(channels) == 1 else channels
    labels = {str(v if not isinstance(v, list) else n): n for n, v in dataset_json["labels"].items()}
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
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 1, "channel_def": labels}},
        },
    }


def export_monet(path: str | Path, network, plans: Mapping, dataset_json: Mapping, configuration: str, *,
                 trainer_class_name: str = "nnUNetTrainer", mirroring_axes: Sequence[int] | None = (0, 1, 2),
                 metadata: Mapping | None = None) -> Path:
    """Trace ``network`` (deep supervision off) and save it as a MONet model.ts with the plans embedded."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    patch = plans["configurations"][configuration]["patch_size"]
    n_in = len(dataset_json["channel_names"])
    network = network.eval()
    with torch.no_grad():
        traced = torch.jit.trace(network, torch.zeros(1, n_in, *patch), check_trace=False)
    inference = {
        "plans": plans,
        "dataset_json": dataset_json,
        "nnunet_configuration": configuration,
        "nnunet_trainer_class_name": trainer_class_name,
        "nnunet_config_ckpt": {
            "inference_allowed_mirroring_axes": list(mirroring_axes) if mirroring_axes is not None else None
        },
    }
    meta = dict(metadata) if metadata is not None else default_metadata(dataset_json)
    torch.jit.save(traced, str(path), _extra_files={
        INFERENCE_JSON: json.dumps(inference, indent=1), METADATA_JSON: json.dumps(meta, indent=1)})
    return path
