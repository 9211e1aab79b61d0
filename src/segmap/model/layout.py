"""Where a model's files are: fold folders, the folds a user chose, and what an nnU-Net results folder looks like.

No reading of the files here: :mod:`.monet` and :mod:`.nnunet_results` do that.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import ModelError

PLANS_JSON = "plans.json"
DATASET_JSON = "dataset.json"

#: A fold's folder: ``fold_0``, ``fold_1``, ..., or ``fold_all``.
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


def is_results_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with nnU-Net's ``plans.json`` and ``dataset.json``."""
    path = Path(path)
    return path.is_dir() and (path / PLANS_JSON).is_file() and (path / DATASET_JSON).is_file()


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
    if is_results_folder(path):  # reached by callers that need model.ts files (e.g. packaging), not load_model
        raise ModelError(f"{path}: an nnU-Net results folder holds no model.ts files; convert it first: "
                         f"segmap convert {path} -o MODEL_DIR")
    raise ModelError(f"{path}: folder holds neither model.ts nor fold_K/model.ts files (nor an nnU-Net results "
                     f"folder's plans.json and dataset.json)")
