"""nnU-Net results folders as models: ``plans.json``, ``dataset.json`` and ``fold_K/checkpoint_final.pth``.

Most nnU-Net users have only what training left behind. A results folder is opened with the same interface as a
MONet model.ts (:class:`~segmap.model.monet.MonetModel`), so ``--model RESULTS_DIR`` works wherever a model.ts does:

- the plans and the labels come from ``plans.json`` and ``dataset.json``; the configuration, the trainer and the
  mirroring axes from the checkpoints (``init_args.configuration``, ``trainer_name``,
  ``inference_allowed_mirroring_axes``), as ``nnUNetPredictor.initialize_from_trained_model_folder`` reads them;
- the network is rebuilt from the plans' ``architecture`` (``network_class_name``, ``arch_kwargs``) with
  ``dynamic_network_architectures``, deep supervision off, and the checkpoint's ``network_weights`` must fit it
  exactly; an architecture that cannot be rebuilt that way (a trainer that builds its own, a cascade stage, plans
  from nnU-Net < 2.4) is refused with the reason;
- the rebuilt network is traced once on a patch of zeros, so that the engine runs the same TorchScript graph as
  for the model.ts that ``segmap convert`` writes from the same folder (same label map, voxel for voxel).

``dynamic_network_architectures`` is needed only here (``pip install 'segmap[nnunet]'``); nnunetv2 never is.
Checkpoints are read the way nnU-Net reads them, with ``torch.load``: first restricted to plain data
(``weights_only``), then, for checkpoints that also pickle NumPy scalars in their training log, unrestricted — a
results folder is code the user trained and trusts, exactly as for nnU-Net's own predictor.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import pydoc
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ModelError
from ..text import first_line
from .layout import DATASET_JSON, FOLD_DIR, PLANS_JSON, select_folds
from .monet import MonetModel, checked_network
from .spec import ModelSpec, parse_spec, resolved_configuration

log = logging.getLogger("segmap.nnunet_results")

#: ``--checkpoint`` choices and the file each names (nnU-Net writes both; the predictor defaults to final).
CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
_DNA = "dynamic_network_architectures"


def checkpoint_file_name(choice: str | None) -> str:
    """``"final"``/``"best"`` (or None: final) -> the checkpoint file name; a ``*.pth`` name is kept as it is."""
    if choice is None:
        return CHECKPOINTS["final"]
    if choice in CHECKPOINTS:
        return CHECKPOINTS[choice]
    if choice.endswith(".pth") and "/" not in choice:
        return choice
    raise ModelError(f"checkpoint '{choice}' is neither {' nor '.join(CHECKPOINTS)} nor a .pth file name")


def read_json_object(path: Path, what: str = "") -> dict:
    """A JSON file holding an object; ``what`` (e.g. ``"metadata file"``) names it in the one-line errors."""
    prefix = f"{what} " if what else ""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ModelError(f"{path}: {prefix or 'file '}not found") from e
    except OSError as e:
        raise ModelError(f"{path}: cannot read {prefix}({e.strerror or e})".replace("  ", " ")) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: {prefix}is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ModelError(f"{path}: {prefix}must hold a JSON object, got {type(value).__name__}")
    return value


def read_checkpoint(path: Path, *, map_location: str = "cpu") -> dict:
    """An nnU-Net checkpoint, memory-mapped (reading its metadata does not read its weights)."""
    import torch

    def load(weights_only: bool):
        return torch.load(str(path), map_location=map_location, mmap=True, weights_only=weights_only)

    try:
        try:
            ckpt = load(True)
        except pickle.UnpicklingError:
            ckpt = load(False)  # NumPy scalars in the training log; see the module docstring
    except FileNotFoundError as e:
        raise ModelError(f"{path}: checkpoint not found") from e
    except Exception as e:  # zip/pickle errors come in many types; the user needs the file and the first line
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)})") from e
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise ModelError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    return ckpt


def _checkpoint_facts(path: Path, ckpt: Mapping) -> tuple[str, str, Any]:
    init_args = ckpt.get("init_args") or {}
    configuration = init_args.get("configuration")
    if not isinstance(configuration, str):
        raise ModelError(f"{path}: checkpoint has no init_args.configuration (not written by nnU-Net v2?)")
    return configuration, str(ckpt.get("trainer_name", "nnUNetTrainer")), ckpt.get("inference_allowed_mirroring_axes")


@dataclass
class ResultsFolderModel(MonetModel):
    """An nnU-Net results folder opened as a model; :attr:`fold_files` are the chosen folds' checkpoints."""

    checkpoint: str = CHECKPOINTS["final"]

    @property
    def plans(self) -> dict:
        return self.inference["plans"]

    @property
    def dataset_json(self) -> dict:
        return self.inference["dataset_json"]

    def build_fold_network(self, index: int, device: str):
        """Fold ``index``'s network rebuilt from the plans with the checkpoint's weights: a plain (eager) module in
        eval mode on ``device``."""
        return rebuild_network(self.fold_files[index], self.plans, self.spec, device)

    def load_networks(self, device: str) -> list:
        """Every fold's rebuilt network, traced on a patch of zeros (the TorchScript graph a converted model.ts
        holds), in eval mode on ``device``."""
        networks = []
        for i, f in enumerate(self.fold_files):
            traced = trace_network(self.build_fold_network(i, device), self.spec, device)
            networks.append(checked_network(traced, self.spec, f))
        return networks


def load_results_folder(path: str | Path, *, folds: str | Sequence[int | str] | None = None,
                        checkpoint: str | None = None) -> ResultsFolderModel:
    """Open an nnU-Net results folder: plans and labels now, weights when :meth:`load_networks` is called.

    ``folds``: e.g. ``"0,1"``, ``[0, 1]``, ``"all"``; default: every ``fold_K`` with the checkpoint (``fold_all``
    only when it is the only one, as nnU-Net's own fold detection ignores it). ``checkpoint``: ``"final"``
    (default), ``"best"`` or a file name.
    """
    path = Path(path)
    name = checkpoint_file_name(checkpoint)
    plans = read_json_object(path / PLANS_JSON)
    dataset = read_json_object(path / DATASET_JSON)
    found = {d.name: d / name for d in path.iterdir() if FOLD_DIR.match(d.name) and (d / name).is_file()}
    if not found:
        others = sorted({p.name for p in path.glob("fold_*/checkpoint*.pth")})
        hint = f" (it has {', '.join(others)}: choose one with checkpoint/--checkpoint)" if others else ""
        raise ModelError(f"{path}: nnU-Net results folder has no fold_K/{name}{hint}")
    if folds is None and len(found) > 1:
        found.pop("fold_all", None)
    files = select_folds(found, folds, path, name)

    facts = []
    for f in files:
        facts.append(_checkpoint_facts(f, read_checkpoint(f)))
    configuration, trainer, mirroring = facts[0]
    for f, other in zip(files[1:], facts[1:]):
        if other[:2] != (configuration, trainer):
            raise ModelError(f"{f}: trained as {other[1]} '{other[0]}', but {files[0]} as {trainer} "
                             f"'{configuration}'; folds of one ensemble must share configuration and trainer")
    inference = {
        "plans": plans,
        "dataset_json": dataset,
        "nnunet_configuration": configuration,
        "nnunet_trainer_class_name": trainer,
        "nnunet_config_ckpt": {"inference_allowed_mirroring_axes": list(mirroring) if mirroring is not None
                               else None},
    }
    spec = parse_spec(inference, {}, path / PLANS_JSON)
    architecture_of(plans, configuration, path / PLANS_JSON)  # refuse what cannot be rebuilt before any run
    return ResultsFolderModel(path=path, fold_files=files, spec=spec, inference=inference,
                              source="nnunet-results", checkpoint=name)


def architecture_of(plans: Mapping, configuration: str, path: Path) -> tuple[str, dict, list]:
    """``(network_class_name, arch_kwargs, _kw_requires_import)`` of a configuration, or a ModelError saying why
    segmap cannot rebuild it."""
    config = resolved_configuration(plans, configuration, path)
    where = f"{path}: configuration '{configuration}'"
    if config.get("previous_stage"):
        raise ModelError(f"{where} is a cascade stage (needs the segmentation of '{config['previous_stage']}' as "
                         "input); segmap runs single-stage configurations")
    arch = config.get("architecture")
    if not isinstance(arch, Mapping) or "network_class_name" not in arch:
        legacy = "UNet_class_name" in config
        raise ModelError(f"{where} has no 'architecture' with a 'network_class_name'"
                         + (" (plans written by nnU-Net before 2.4; re-plan with a current nnU-Net)" if legacy else ""))
    return str(arch["network_class_name"]), dict(arch.get("arch_kwargs") or {}), list(
        arch.get("_kw_requires_import") or [])


def _locate_network_class(name: str, path: Path):
    try:
        import dynamic_network_architectures  # noqa: F401
    except ImportError as e:
        raise ModelError(f"{path}: rebuilding an nnU-Net network needs dynamic-network-architectures "
                         "(pip install 'segmap[nnunet]')") from e
    problems: list[str] = []
    cls = _locate(name, problems)
    if cls is None:  # nnU-Net also finds a bare class name anywhere in dynamic_network_architectures.architectures
        short = name.rsplit(".", 1)[-1]
        for module in ("unet", "residual_unet", "primus"):
            cls = _locate(f"{_DNA}.architectures.{module}.{short}", problems)
            if cls is not None:
                break
    if cls is None:
        why = f"; {problems[0]}" if problems else ""
        raise ModelError(f"{path}: network class '{name}' cannot be imported; segmap rebuilds architectures from "
                         f"{_DNA} (installed: {_dna_version()}){why}")
    return cls


def _locate(dotted: str, problems: list[str]):
    """``pydoc.locate`` that reports a module failing to import (e.g. a torchvision mismatch) instead of raising."""
    try:
        return pydoc.locate(dotted)
    except pydoc.ErrorDuringImport as e:
        problems.append(f"importing {e.filename} failed: {first_line(e.value)}")
        return None


def _dna_version() -> str:
    try:
        return version("dynamic_network_architectures")
    except PackageNotFoundError:
        return "?"


def build_network(plans: Mapping, configuration: str, num_input_channels: int, num_outputs: int, *,
                  path: Path = Path(PLANS_JSON)):
    """The plans' network for ``configuration``, built as nnU-Net builds it (deep supervision off), with fresh
    weights."""
    name, kwargs, requires_import = architecture_of(plans, configuration, path)
    cls = _locate_network_class(name, path)
    kwargs = copy.deepcopy(kwargs)
    for key in requires_import:
        if kwargs.get(key) is not None:
            problems: list[str] = []
            located = _locate(kwargs[key], problems)
            if located is None:
                raise ModelError(f"{path}: arch_kwargs '{key}' names '{kwargs[key]}', which cannot be imported")
            kwargs[key] = located
    try:
        return cls(input_channels=num_input_channels, num_classes=num_outputs, deep_supervision=False, **kwargs)
    except TypeError as e:
        raise ModelError(f"{path}: {name} cannot be built from the plans' arch_kwargs ({first_line(e)})") from e


def _strip_prefixes(state: Mapping[str, Any]) -> dict:
    """Weights saved from a compiled (``_orig_mod.``) or data-parallel (``module.``) network, under the plain names."""
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def rebuild_network(checkpoint: Path, plans: Mapping, spec: ModelSpec, device: str):
    """The network of one checkpoint, rebuilt from the plans, weights loaded strictly, eval mode, on ``device``."""
    import torch

    ckpt = read_checkpoint(checkpoint)
    net = build_network(plans, spec.configuration, spec.num_channels, spec.num_outputs, path=checkpoint)
    state = _strip_prefixes(ckpt["network_weights"])
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
            f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs "
            f"{tuple(expected[wrong[0]].shape)})" if wrong else "") if part)
        name = architecture_of(plans, spec.configuration, checkpoint)[0]
        raise ModelError(f"{checkpoint}: the weights do not fit the network the plans describe ({name} for trainer "
                         f"{spec.trainer_class_name}): {detail}; a trainer that builds its own architecture cannot "
                         "be rebuilt")
    with torch.no_grad():
        net.load_state_dict(state, strict=True)
    return net.to(device).eval()


def trace_network(network, spec: ModelSpec, device: str):
    """``network`` traced on one ``[1, C, *patch]`` tile of zeros (nnU-Net networks have no data-dependent
    control flow with deep supervision off, so the trace is the network)."""
    import torch

    example = torch.zeros(1, spec.num_channels, *spec.patch_size, device=device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=DeprecationWarning)
        return torch.jit.trace(network.eval(), example, check_trace=False)
