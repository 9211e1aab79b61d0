"""A readable summary of a MONet model: what ``segmap inspect`` prints.

It shows what a user needs to write a matching task file and to judge the deployment cost: the input names (the
task's modality keys), the label values (what ``Segments`` must describe, in order), and the plans' geometry.
"""

from __future__ import annotations

from typing import Any, Sequence

from .model import ModelSpec, MonetModel, ResamplingSpec

_AXES = "zyx"


def _fmt_num(v: float) -> str:
    return f"{v:g}"


def _vector(values: Sequence[Any], fmt=str) -> str:
    return " x ".join(fmt(v) for v in values)


def _axis_names(transpose_forward: Sequence[int]) -> str:
    """Names of the network axes in terms of the image's (z, y, x) axes, e.g. ``(z, y, x)`` or ``(x, y, z)``."""
    return "(" + ", ".join(_AXES[a] for a in transpose_forward) + ")"


def _resampling(r: ResamplingSpec) -> str:
    separate = {None: "auto", True: "always", False: "never"}[r.force_separate_z]
    return (f"order {r.order}, out-of-plane order {r.order_z}, separate z: {separate} "
            f"(anisotropy threshold {_fmt_num(r.separate_z_anisotropy_threshold)})")


def _label_lines(spec: ModelSpec) -> list[str]:
    if spec.has_regions:
        lines = ["  regions (value: name = union of training labels; sigmoid > 0.5 per region, painted in "
                 f"regions_class_order {list(spec.regions_class_order)}):"]
        value_of = {n: v for v, n in spec.foreground_labels}
        # by painted value (MONet's files list the regions alphabetically; the value is what a task describes)
        for name, region in sorted(spec.labels.items(), key=lambda kv: (kv[0] in value_of, value_of.get(kv[0], 0))):
            members = list(region) if isinstance(region, (list, tuple)) else [region]
            value = value_of.get(name)
            lines.append(f"    {value if value is not None else '-'}: {name} = {members}"
                         + (" (background, not an output)" if value is None else ""))
        return lines
    lines = ["  labels (value: name; Segments[i-1] of a task describes value i):"]
    for name, value in sorted(spec.labels.items(), key=lambda kv: int(kv[1])):
        lines.append(f"    {int(value)}: {name}")
    return lines


def spec_architecture(model: MonetModel) -> str | None:
    """The plans' ``network_class_name`` of the model's configuration, where the plans name one."""
    try:
        config = model.inference["plans"]["configurations"][model.spec.configuration]
        return config.get("architecture", {}).get("network_class_name")
    except (KeyError, TypeError, AttributeError):
        return None


def describe_model(model: MonetModel) -> str:
    """Multi-line, human-readable description of a model (plans, channels, labels, folds)."""
    spec = model.spec
    meta = spec.metadata or {}
    lines = [f"model: {model.path}"]
    if model.source == "nnunet-results":
        arch = (spec_architecture(model) or "?").rsplit(".", 1)[-1]
        lines.append(f"  source: nnU-Net results folder, {getattr(model, 'checkpoint', '?')} per fold; network "
                     f"rebuilt from the plans ({arch}; needs dynamic-network-architectures)")
    if model.num_folds == 1:
        lines.append("  folds: 1 (single model.ts)" if model.source == "model.ts" else "  folds: 1")
        if model.fold_files[0] != model.path:
            lines.append(f"    {model.fold_files[0]}")
    else:
        lines.append(f"  folds: {model.num_folds} (ensemble: logits averaged)")
        lines += [f"    {f}" for f in model.fold_files]
    if meta:
        name = meta.get("task") or meta.get("name")
        lines.append(f"  metadata: version {meta.get('version', '?')}" + (f", task '{name}'" if name else ""))
        if meta.get("description"):
            lines.append(f"    description: {meta['description']}")
    lines.append(f"  nnU-Net configuration: {spec.configuration}, trainer {spec.trainer_class_name}")

    lines.append(f"  inputs ({spec.num_channels}; task modality key -> nnU-Net channel -> normalisation):")
    for c, (name, channel, norm) in enumerate(zip(spec.input_names, spec.channel_names, spec.normalization)):
        mask = ", within the nonzero mask" if norm.use_mask_for_norm else ""
        lines.append(f"    {c}: {name} -> {channel} -> {norm.scheme}{mask}")

    identity = tuple(spec.transpose_forward) == (0, 1, 2)
    order = _axis_names(spec.transpose_forward)
    lines.append(f"  axis order: network {order} = image (z, y, x) after transpose_forward "
                 f"{list(spec.transpose_forward)} (transpose_backward {list(spec.transpose_backward)})"
                 + (" - no transpose" if identity else ""))
    lines.append(f"  patch size: {_vector(spec.patch_size)} voxels, network order {order}")
    lines.append(f"  target spacing: {_vector(spec.target_spacing, _fmt_num)} mm, network order {order}")
    if not identity:
        back = spec.transpose_backward
        lines.append(f"    in image (z, y, x) order: patch {_vector([spec.patch_size[a] for a in back])}, "
                     f"spacing {_vector([spec.target_spacing[a] for a in back], _fmt_num)} mm")

    lines += _label_lines(spec)
    lines.append(f"  output channels: {spec.num_outputs}")
    if spec.mirroring_axes:
        axes = ", ".join(f"{a} ({_AXES[spec.transpose_forward[a]]})" for a in spec.mirroring_axes)
        lines.append(f"  test-time mirroring allowed along network axes: {axes} (off unless --mirroring)")
    else:
        lines.append("  test-time mirroring: not allowed by the model")
    lines.append(f"  resampling of images: {_resampling(spec.data_resampling)}")
    lines.append(f"  resampling of logits back: {_resampling(spec.probabilities_resampling)}")
    return "\n".join(lines)
