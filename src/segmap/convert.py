"""``segmap convert``: an nnU-Net results folder -> MONet ``fold_K/model.ts`` files.

    segmap convert RESULTS_DIR [--metadata metadata.json] -o MODEL_DIR [--folds 0,1] [--checkpoint final|best]

This is the step MAIA users run after training (MONet's ``MONet_convert_ckpt_to_ts.py`` through MONAI's
``ckpt_export``), done so that both segmap and MONet's own tools accept the result:

- each fold's network is rebuilt from the plans (:mod:`segmap.model.nnunet_results`; an architecture that cannot be
  rebuilt is refused before anything is written), traced (``--script`` scripts it instead, as MONet does, which
  needs a scriptable dynamic-network-architectures such as MONet's fork) and saved as ``fold_K/model.ts``;
- ``inference.json`` holds what MONet's current format holds (:func:`segmap.model.export.monet_inference_document`:
  ``plans``, ``dataset_json``, ``nnunet_configuration``, ``nnunet_trainer_class_name``, ``nnunet_config_ckpt``,
  ``nnunet_config_dict``, ``network_def``) and ``metadata.json`` the bundle metadata given with ``--metadata``,
  completed with ``network_data_format`` from dataset.json where it lacks it (MONet's inference reads
  ``network_data_format.inputs`` and ``outputs.pred.channel_def``);
- the saved file is loaded back and run next to the checkpoint's network on a seeded random input; the largest
  absolute difference of the logits is reported, and a conversion that changes them beyond a tolerance fails;
- files are written under a staging folder and moved into place only when every fold converted.

Beyond TorchScript
------------------
``torch.jit`` is deprecated (torch 2.13 warns on ``torch.jit.save``); TorchScript is what MONet users have today.
The successor is ``torch.export``: ``ep = torch.export.export(network, (torch.zeros(1, C, *patch),))`` captures the
same rebuilt network as an ``ExportedProgram`` (nnU-Net networks have no data-dependent control flow, and the engine
only ever feeds whole patches, so no dynamic shapes are needed), ``torch.export.save(ep, "model.pt2",
extra_files={"inference.json": ..., "metadata.json": ...})`` stores it with the same two documents, and
``torch.export.load("model.pt2", extra_files=...).module()`` gives back a callable module. A ``.pt2`` model then
needs only a third loader behind :class:`segmap.model.MonetModel`: ``read_extra_files`` for the documents and
``load_networks`` returning ``ep.module()`` per fold; the engine, which calls ``load_networks`` and the networks,
is unchanged (on the CPU it would skip TorchScript's freeze/fuse step and use ``torch.compile`` instead). See
``docs/models.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import ModelError, OutputError
from .model import default_metadata, export_monet, is_results_folder, load_model, parse_folds
from .model.nnunet_results import load_results_folder, read_json_object, trace_network
from .text import first_line

log = logging.getLogger("segmap.convert")

#: Largest tolerated |logit difference| between the checkpoint's network and the saved model, relative to the
#: largest |logit| (at least 1). Tracing reproduces the network's kernels, so the measured difference is 0 on the
#: CPU; a different graph would show up as orders of magnitude more.
TOLERANCE = 1e-4
STAGING = ".segmap-convert"


@dataclass(frozen=True)
class ConvertedFold:
    fold: str
    path: Path
    #: Largest absolute logit difference between the checkpoint's network and the saved model.ts.
    max_abs_diff: float
    #: Largest absolute logit of the checkpoint's network on the same input (the scale of the difference).
    max_abs_logit: float
    input_shape: tuple[int, ...]


def read_metadata(path: str | Path | None) -> dict:
    """The ``--metadata`` file (MONAI bundle metadata.json), or an empty document."""
    if path is None:
        return {}
    return read_json_object(Path(path), "metadata file")


def complete_metadata(metadata: Mapping[str, Any], dataset_json: Mapping[str, Any], *,
                      source: str = "metadata.json") -> dict:
    """``metadata`` with ``network_data_format`` filled in from dataset.json where it is missing; its inputs must
    be one per dataset.json channel (they become the task file's modality keys)."""
    meta = json.loads(json.dumps(metadata))  # a deep, JSON-clean copy
    defaults = default_metadata(dataset_json)
    meta.setdefault("version", defaults["version"])
    fmt = meta.setdefault("network_data_format", {})
    if not isinstance(fmt, dict):
        raise ModelError(f"{source}: 'network_data_format' must be an object")
    inputs = fmt.get("inputs")
    channels = len(dataset_json["channel_names"])
    if not inputs:
        fmt["inputs"] = defaults["network_data_format"]["inputs"]
    elif not isinstance(inputs, dict) or len(inputs) != channels:
        names = list(inputs) if isinstance(inputs, dict) else inputs
        raise ModelError(f"{source}: network_data_format.inputs {names} must name one input per dataset.json "
                         f"channel ({channels}: {list(dataset_json['channel_names'].values())})")
    outputs = fmt.setdefault("outputs", {})
    pred = outputs.setdefault("pred", {})
    if not pred.get("channel_def"):
        outputs["pred"] = {**defaults["network_data_format"]["outputs"]["pred"], **pred,
                           "channel_def": defaults["network_data_format"]["outputs"]["pred"]["channel_def"]}
    return meta


def _script(network, path: Path):
    import torch

    try:
        return torch.jit.script(network)
    except Exception as e:  # TorchScript's frontend raises several error types with multi-line source excerpts
        raise ModelError(f"{path}: the network cannot be scripted ({first_line(e)}); "
                         "the stock dynamic-network-architectures is not scriptable: convert without --script "
                         "(traced), or install a scriptable fork such as MONet's") from e


def _max_abs_diff(reference, module, spec, seed: int) -> tuple[float, float, tuple[int, ...]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, spec.num_channels, *spec.patch_size, generator=g)
    with torch.no_grad():
        want = reference(x)
        got = module(x)
    if not isinstance(got, torch.Tensor):
        got = got[0]
    return float((want - got).abs().max()), float(want.abs().max()), tuple(x.shape)


def convert_results_folder(results: str | Path, out: str | Path, *, metadata: Mapping[str, Any] | None = None,
                           metadata_source: str = "metadata.json", folds: str | Sequence[int | str] | None = None,
                           checkpoint: str | None = None, script: bool = False, force: bool = False,
                           seed: int = 0, tolerance: float = TOLERANCE,
                           report: Callable[[str], None] = lambda line: None) -> list[ConvertedFold]:
    """Convert the chosen folds of an nnU-Net results folder into ``out/fold_K/model.ts`` (MONet format).

    Nothing is written unless every fold converts and matches its checkpoint within ``tolerance``; existing
    ``fold_K/model.ts`` files in ``out`` are replaced only with ``force``.
    """
    import torch

    results, out = Path(results), Path(out)
    if not is_results_folder(results):
        raise ModelError(f"{results}: not an nnU-Net results folder (expected plans.json, dataset.json and "
                         "fold_K/checkpoint_final.pth)")
    model = load_results_folder(results, folds=folds, checkpoint=checkpoint)
    meta = complete_metadata(metadata or {}, model.dataset_json, source=metadata_source)
    names = model.fold_names
    clashes = [out / n / "model.ts" for n in names if (out / n / "model.ts").exists()]
    if clashes and not force:
        raise OutputError(f"{clashes[0]} already exists (use --force to replace it)")
    # Conversion runs on the CPU: the saved weights are device-independent and the check must be exact.
    # Rebuild the first fold before anything is created: an architecture that cannot be rebuilt leaves no trace.
    first = model.build_fold_network(0, "cpu")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = out / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as e:
        raise OutputError(f"{out}: cannot write the converted model ({e.strerror or e})") from e

    converted = []
    try:
        for i, name in enumerate(names):
            network = first if i == 0 else model.build_fold_network(i, "cpu")
            module = _script(network, model.fold_files[i]) if script else trace_network(network, model.spec, "cpu")
            fold = name[5:] if name.startswith("fold_") else name
            target = staging / name / "model.ts"
            export_monet(target, module, model.plans, model.dataset_json, model.spec.configuration,
                         trainer_class_name=model.spec.trainer_class_name,
                         mirroring_axes=model.spec.mirroring_axes or None, metadata=meta,
                         fold=fold, checkpoint_name=model.checkpoint)
            diff, scale, shape = _max_abs_diff(network, torch.jit.load(str(target)), model.spec, seed)
            if not diff <= tolerance * max(1.0, scale):
                raise ModelError(f"{model.fold_files[i]}: the converted network differs from the checkpoint's by "
                                 f"max |diff| {diff:.3g} (logits up to {scale:.3g}); not written")
            converted.append(ConvertedFold(name, out / name / "model.ts", diff, scale, shape))
            report(f"{name}: {model.fold_files[i]} -> {out / name / 'model.ts'} "
                   f"({'scripted' if script else 'traced'}; max |diff| {diff:.3g} vs the checkpoint on a random "
                   f"{'x'.join(map(str, shape))} input, logits up to {scale:.3g})")
        # The files are complete and match; check that segmap reads them as one model before moving them in.
        check = load_model(staging)
        if check.spec.foreground_labels != model.spec.foreground_labels or check.num_folds != len(names):
            raise ModelError(f"{staging}: the converted files do not read back as the results folder's model")
        for name in names:
            (out / name).mkdir(exist_ok=True)
            os.replace(staging / name / "model.ts", out / name / "model.ts")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return converted


def _cmd_convert(args: argparse.Namespace) -> int:
    folds = parse_folds(args.folds)
    converted = convert_results_folder(
        args.results, args.output, metadata=read_metadata(args.metadata),
        metadata_source=str(args.metadata or "metadata.json"), folds=folds, checkpoint=args.checkpoint,
        script=args.script, force=args.force, report=print)
    print(f"converted {len(converted)} fold(s) into {args.output}; check it with: segmap inspect {args.output}")
    return 0


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``segmap convert`` on the CLI's sub-command parsers."""
    p = subparsers.add_parser(
        "convert", help="turn an nnU-Net results folder into MONet fold_K/model.ts files",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  segmap convert nnUNet_results/Dataset009_Spleen/nnUNetTrainer__nnUNetPlans__3d_fullres "
               "--metadata metadata.json -o models/spleen\n\nEach fold's converted network is checked against its "
               "checkpoint on a random input (max |diff| is printed).")
    p.add_argument("results", type=Path, help="nnU-Net results folder (plans.json, dataset.json, fold_K/)")
    p.add_argument("-o", "--output", type=Path, required=True, help="model folder to write fold_K/model.ts into")
    p.add_argument("--metadata", type=Path, default=None,
                   help="MONAI bundle metadata.json to embed (network_data_format is filled in from dataset.json "
                        "where missing)")
    p.add_argument("--folds", default=None, help="folds to convert, e.g. 0,1 or all (default: every fold_K)")
    p.add_argument("--checkpoint", default="final",
                   help="final (checkpoint_final.pth, default), best (checkpoint_best.pth) or a file name")
    p.add_argument("--script", action="store_true",
                   help="torch.jit.script the network as MONet does (needs a scriptable dynamic-network-"
                        "architectures); default: trace it")
    p.add_argument("--force", action="store_true", help="replace existing fold_K/model.ts files")
    p.set_defaults(func=_cmd_convert)
    return p
