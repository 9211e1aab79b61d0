"""MONet Bundle model files: TorchScript nnU-Net networks with nnU-Net's plans embedded.

A ``model.ts`` is a TorchScript archive of the bare network (deep supervision off). It carries two extra files,
``inference.json`` (nnU-Net's ``plans``, ``dataset_json``, ``nnunet_configuration``, ...) and ``metadata.json``
(MONAI bundle metadata). A directory holding ``fold_K/model.ts`` files is an ensemble of folds. Every variant
MONet has written is read (the documents' variants: :mod:`.spec`), scripted networks (``torch.jit.script``,
MONet's way; declared return ``Union[Tensor, List[Tensor]]``) and traced ones alike.

The embedded files are read straight from the zip archive, so inspecting or validating a model never
deserialises its weights; :meth:`MonetModel.load_networks` does that when inference needs them. torch is imported
there only, so that reading plans stays cheap.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ModelError
from ..text import first_line
from .layout import FOLD_DIR, find_fold_files
from .spec import INFERENCE_JSON, METADATA_JSON, ModelSpec, parse_spec


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
    #: "model.ts" (MONet TorchScript files) or "nnunet-results" (see :mod:`segmap.model.nnunet_results`).
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
        import torch

        networks = []
        for f in self.fold_files:
            try:
                with warnings.catch_warnings():  # TorchScript is what MONet writes; docs/models.md has the way on
                    warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated",
                                            category=DeprecationWarning)
                    net = torch.jit.load(str(f), map_location=device)
            except Exception as e:  # torch raises RuntimeError subclasses with long C++ traces
                raise ModelError(f"{f}: cannot load the TorchScript network ({first_line(e)})") from e
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


def load_monet(path: Path, folds: str | Sequence[int | str] | None = None) -> MonetModel:
    """Open a model.ts or a folder of ``fold_K/model.ts`` files (every fold, or the chosen ``folds``)."""
    path = Path(path)
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
