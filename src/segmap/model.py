"""MONet Bundle model files: TorchScript nnU-Net networks with nnU-Net's plans embedded.

A ``model.ts`` is a TorchScript archive of the bare network (deep supervision off). It carries two extra files,
``inference.json`` (nnU-Net's ``plans``, ``dataset_json``, ``nnunet_configuration``, ...) and ``metadata.json``
(MONAI bundle metadata). A directory holding ``fold_K/model.ts`` files is an ensemble of folds.

Every variant MONet has written is read:

- the current format (top-level ``nnunet_configuration``) and the archived one, where the configuration is only in
  ``nnunet_config_ckpt.configuration``; ``nnunet_config_ckpt`` values may be unresolved MONAI-bundle references
  (``"@nnunet_configuration"``), which are resolved against ``inference.json`` the way MONAI's ``ConfigParser``
  would;
- ``dataset_json.labels`` in any key order: MONet's YAML round trip sorts it alphabetically, so region names are
  paired with ``regions_class_order`` values by the values each region holds, never by dict position;
- scripted networks (``torch.jit.script``, MONet's way; declared return ``Union[Tensor, List[Tensor]]``) and traced
  ones.

An nnU-Net results folder (``plans.json``, ``dataset.json``, ``fold_K/checkpoint_final.pth``) is a model too, with
the same interface: see :mod:`segmap.nnunet_results`.

The embedded files are read straight from the zip archive, so inspecting or validating a model never
deserialises its weights; :meth:`MonetModel.load_networks` does that when inference needs them.

All per-axis values in :class:`ModelSpec` are in nnU-Net's transposed ("network") axis order, exactly as the
plans store them.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import ModelError

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


@dataclass
class MonetModel:
    """One model: a single ``model.ts``, several folds sharing the same plans, or an nnU-Net results folder.

    The engine and the commands use only :attr:`spec`, :attr:`fold_files` (hashed into the run report) and
    :meth:`load_networks`.
    """

    path: Path
    fold_files: list[Path]
    spec: ModelSpec
    inference: Mapping[str, Any]
    #: "model.ts" (MONet TorchScript files) or "nnunet-results" (see :mod:`segmap.nnunet_results`).
    source: str = "model.ts"

    @property
    def num_folds(self) -> int:
        return len(self.fold_files)

    @property
    def fold_names(self) -> list[str]:
        """``fold_K`` of each file (the file name where it is not in a fold folder)."""
        return [f.parent.name if FOLD_DIR.match(f.parent.name) else f.name for f in self.fold_files]

    def load_networks(self, device: str) -> list:
        """Deserialise every fold's TorchScript network onto ``device``, in eval mode, each returning logits."""
        import warnings

        import torch

        networks = []
        for f in self.fold_files:
            try:
                with warnings.catch_warnings():  # TorchScript is what MONet writes; docs/models.md has the way on
                    warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated",
                                            category=DeprecationWarning)
                    net = torch.jit.load(str(f), map_location=device)
            except Exception as e:  # torch raises RuntimeError subclasses with long C++ traces
                raise ModelError(f"{f}: cannot load the TorchScript network ({_first_line(e)})") from e
            net.eval()
            networks.append(checked_network(net, self.spec, f))
        return networks


def _first_conv_and_head(module) -> tuple[Any, Any]:
    """The first convolution weight (input channels) and the last ``seg_layers`` weight (output channels)."""
    first = head = None
    head_index = -1
    for name, p in module.named_parameters():
        if p.ndim >= 3 and first is None:
            first = p
        m = re.search(r"seg_layers\.(\d+)\.weight$", name)
        if m and int(m.group(1)) > head_index:
            head, head_index = p, int(m.group(1))
    return first, head


def checked_network(net, spec: ModelSpec, path: Path):
    """``net`` after checking that it fits the plans; a network that may return deep-supervision lists is wrapped
    so that the engine always receives the full-resolution logits tensor.

    The checks read the forward signature and the weights only (no forward pass): one input tensor, the
    plans' number of input channels on the first convolution, and one output channel per segmentation head on
    nnU-Net's ``seg_layers`` (when the network has them).
    """
    import torch

    schema = getattr(getattr(net, "forward", None), "schema", None)
    returns = "Tensor"
    if schema is not None:
        args = [a for a in schema.arguments if a.name != "self"]
        if not args or any(not a.has_default_value() for a in args[1:]):
            raise ModelError(f"{path}: the network's forward is {schema}; expected one input tensor [B, C, *patch]")
        returns = str(schema.returns[0].type) if schema.returns else "NoneType"
        if "Tensor" not in returns:
            raise ModelError(f"{path}: the network returns {returns}; expected logits (Tensor)")
    first, head = _first_conv_and_head(net)
    if first is not None and first.shape[1] != spec.num_channels:
        raise ModelError(f"{path}: the network's first convolution takes {first.shape[1]} input channel(s) but the "
                         f"plans' dataset_json has {spec.num_channels} {list(spec.channel_names)}")
    if head is not None and head.shape[0] != spec.num_outputs:
        raise ModelError(f"{path}: the network has {head.shape[0]} output channel(s) but dataset_json describes "
                         f"{spec.num_outputs} ({'regions' if spec.has_regions else 'labels incl. background'})")
    if returns != "Tensor":
        return torch.jit.script(_first_output_adapter()(net))
    return net


@functools.cache
def _first_output_adapter():
    """A TorchScript-compatible module class returning a network's full-resolution logits when the network may
    return nnU-Net's deep-supervision list (``Union[Tensor, List[Tensor]]``); defined on first use so that
    reading plans never imports torch."""
    import torch

    class FirstOutput(torch.nn.Module):
        def __init__(self, net) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.net(x)
            if isinstance(out, torch.Tensor):
                return out
            return out[0]

    return FirstOutput


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
    if not found.get(INFERENCE_JSON) and not any("/code/" in n for n in names):
        # torch.save's archive (a checkpoint, a state dict), not TorchScript
        raise ModelError(f"{path}: a PyTorch checkpoint, not a TorchScript model.ts; for an nnU-Net checkpoint give "
                         f"its results folder (plans.json, dataset.json, fold_K/) or convert it with segmap convert")
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


FOLD_DIR = re.compile(r"^fold_(\d+|all)$")


def _fold_sort_key(name: str) -> tuple[bool, int]:
    return (name == "fold_all", int(name[5:]) if name != "fold_all" else 0)


def parse_folds(text: str | Sequence[int | str] | None) -> tuple[str, ...] | None:
    """Fold names from a ``--folds`` value (``"0,1"``, ``"all"``, ``"fold_2"``) or a list of ints/names; None
    (every fold) for None or an empty value."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    names = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        name = item if item.startswith("fold_") else f"fold_{item}"
        if not FOLD_DIR.match(name):
            raise ModelError(f"fold '{item}' is not a fold number or 'all' (e.g. --folds 0,1,2)")
        if name not in names:
            names.append(name)
    return tuple(names) or None


def select_folds(found: Mapping[str, Path], folds: Sequence[int | str] | None, path: Path, what: str) -> list[Path]:
    """The files of the requested ``folds`` (names as :func:`parse_folds` gives) among ``found`` (fold name ->
    file), in fold order; every fold when ``folds`` is None."""
    wanted = parse_folds(folds)
    if wanted is None:
        return [found[k] for k in sorted(found, key=_fold_sort_key)]
    missing = [k for k in wanted if k not in found]
    if missing:
        have = ", ".join(sorted(found, key=_fold_sort_key)) or "none"
        raise ModelError(f"{path}: no {what} for {', '.join(missing)} (found: {have})")
    return [found[k] for k in sorted(wanted, key=_fold_sort_key)]


def find_fold_files(path: Path, folds: Sequence[int | str] | None = None) -> list[Path]:
    """The model.ts files behind ``path``: the file itself, or every (or every selected) ``fold_K/model.ts`` of a
    directory."""
    path = Path(path)
    if path.is_file():
        if folds is not None:
            raise ModelError(f"{path}: folds can only be chosen for a folder of fold_K/model.ts files")
        return [path]
    if not path.is_dir():
        raise ModelError(f"{path}: model not found (expected a model.ts file, a folder of fold_K/model.ts or an "
                         f"nnU-Net results folder)")
    found = {d.name: d / "model.ts" for d in path.iterdir() if FOLD_DIR.match(d.name) and (d / "model.ts").is_file()}
    if found:
        return select_folds(found, folds, path, "fold_K/model.ts")
    if (path / "model.ts").is_file() and folds is None:
        return [path / "model.ts"]
    from .nnunet_results import is_results_folder

    if is_results_folder(path):  # reached by callers that need model.ts files (e.g. packaging), not load_model
        raise ModelError(f"{path}: an nnU-Net results folder holds no model.ts files; convert it first: "
                         f"segmap convert {path} -o MODEL_DIR")
    raise ModelError(f"{path}: folder holds neither model.ts nor fold_K/model.ts files (nor an nnU-Net results "
                     f"folder's plans.json and dataset.json)")


def load_model(path: str | Path, *, folds: str | Sequence[int | str] | None = None,
               checkpoint: str | None = None) -> MonetModel:
    """Open a model and read its plans; weights are loaded later, on demand (:meth:`MonetModel.load_networks`).

    ``path``: a MONet model.ts, a folder of ``fold_K/model.ts`` files, or an nnU-Net results folder
    (``plans.json``, ``dataset.json``, ``fold_K/checkpoint_final.pth``). ``folds``: which folds to ensemble (e.g.
    ``"0,1"`` or ``[0, 1]``; default every fold). ``checkpoint``: for a results folder, ``"final"`` (default),
    ``"best"`` or a checkpoint file name.
    """
    from .nnunet_results import is_results_folder, load_results_folder

    path = Path(path)
    if is_results_folder(path):
        return load_results_folder(path, folds=folds, checkpoint=checkpoint)
    if checkpoint is not None:
        raise ModelError(f"{path}: a checkpoint can only be chosen for an nnU-Net results folder (plans.json, "
                         f"dataset.json, fold_K/checkpoint_*.pth)")
    files = find_fold_files(path, folds)
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
    import os
    import warnings

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
