"""The one sha256 that names a model: in run reports (``model.sha256``), in the SEG's Software Versions and in a
MAP image's ``io.segmap.model.sha256`` label, which must agree for the same model files.

One file (a model.ts): that file's own sha256, so that ``sha256sum model.ts`` finds it. Several (an ensemble, or a
results folder's checkpoints): the sha256 over one ``fold_K/<file name>\\0<sha256>\\n`` line per file, in fold
order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def model_digest(files: Sequence[str | Path], sha256s: Sequence[str] | None = None) -> str:
    """The digest of a model's ``files`` in fold order (:attr:`~segmap.model.MonetModel.fold_files`).

    ``sha256s``: each file's sha256 where the caller has them already (a run report lists them), else they are
    computed here."""
    files = [Path(f) for f in files]
    sums = [sha256_file(f) for f in files] if sha256s is None else [str(s) for s in sha256s]
    if len(files) != len(sums):
        raise ValueError(f"{len(files)} model files but {len(sums)} sha256 values")
    if len(files) == 1:
        return sums[0]
    digest = hashlib.sha256()
    for f, sha in zip(files, sums):
        digest.update(f"{f.parent.name}/{f.name}\0{sha}\n".encode())
    return digest.hexdigest()
