"""Models: what segmap runs, opened from MONet model.ts files or nnU-Net results folders.

:func:`load_model` opens either kind and returns a :class:`MonetModel` (the engine and the commands use its
``spec``, ``fold_files`` and ``load_networks`` only). Beside it:

- :mod:`.spec`: the plans and labels a model declares (:class:`ModelSpec`, :func:`parse_spec`);
- :mod:`.layout`: where a model's files are (fold folders, the chosen folds, a results folder's files);
- :mod:`.monet`: the MONet model.ts reader; :mod:`.nnunet_results`: the nnU-Net results folder reader;
- :mod:`.export`: writing MONet model.ts files; :mod:`.digest`: the one sha256 that names a model.

Nothing here imports torch until networks are loaded or written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import ModelError
from .digest import model_digest
from .export import default_metadata, export_monet
from .layout import FOLD_DIR, find_fold_files, is_results_folder, parse_folds
from .monet import MonetModel, load_monet
from .nnunet_results import load_results_folder
from .spec import ChannelNormalization, ModelSpec, ResamplingSpec, parse_spec

__all__ = ["FOLD_DIR", "ChannelNormalization", "ModelSpec", "MonetModel", "ResamplingSpec", "default_metadata",
           "export_monet", "find_fold_files", "is_results_folder", "load_model", "model_digest", "parse_folds",
           "parse_spec"]


def load_model(path: str | Path, *, folds: str | Sequence[int | str] | None = None,
               checkpoint: str | None = None) -> MonetModel:
    """Open a model and read its plans; weights are loaded later, on demand (:meth:`MonetModel.load_networks`).

    ``path``: a MONet model.ts, a folder of ``fold_K/model.ts`` files, or an nnU-Net results folder
    (``plans.json``, ``dataset.json``, ``fold_K/checkpoint_final.pth``). ``folds``: which folds to ensemble (e.g.
    ``"0,1"`` or ``[0, 1]``; default every fold). ``checkpoint``: for a results folder, ``"final"`` (default),
    ``"best"`` or a checkpoint file name.
    """
    path = Path(path)
    if is_results_folder(path):
        return load_results_folder(path, folds=folds, checkpoint=checkpoint)
    if checkpoint is not None:
        raise ModelError(f"{path}: a checkpoint can only be chosen for an nnU-Net results folder (plans.json, "
                         f"dataset.json, fold_K/checkpoint_*.pth)")
    return load_monet(path, folds)
