"""All-or-nothing outputs: a run's files appear in the output folder only when the whole run succeeded.

Usage::

    out = ensure_writable(output_folder)          # early, before inference: fail fast on a bad output folder
    ...
    with atomic_outputs(out) as staging:
        write_seg(..., staging.dir / "seg.dcm")
        report.write(staging.dir / "run_report.json")
    # here every file is in `out`; staging.committed lists their final paths

The staging folder is a hidden ``.segmap-staging-*`` directory created *inside* the output folder, so the final
``os.replace`` of each file is a rename on one file system: atomic per file, no copy, and no extra space needed.
If the ``with`` block raises (including KeyboardInterrupt), the staging folder is deleted and the output folder is
left exactly as it was. On success, files are moved in sorted path order with ``run_report.json`` last, so a
consumer that waits for the report sees every other file already in place; same-named files from an earlier run
are replaced. Sub-folders are recreated in the output folder. A process killed outright (SIGKILL, power loss) can
leave a staging folder behind; it is hidden and never mistaken for output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import OutputError
from .report import REPORT_NAME

STAGING_PREFIX = ".segmap-staging-"
#: Files moved into place after all others.
COMMIT_LAST = (REPORT_NAME,)


def ensure_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove it is writable by creating and removing a file in it.

    A real write is the only test that holds for root (which ``chmod`` does not stop), read-only mounts and ACLs.
    Returns the folder as an absolute :class:`~pathlib.Path`; raises :class:`~segmap.errors.OutputError` naming
    the folder otherwise.
    """
    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: output folder is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".segmap-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{folder}: output folder is not writable ({e.strerror or e})") from e
    return folder


@dataclass
class Staging:
    """Where a run writes its outputs before they are committed to :attr:`final_dir`."""

    #: The temporary folder to write into.
    dir: Path
    #: The output folder the files end up in.
    final_dir: Path
    #: Final paths of the committed files, filled in when the ``with`` block ends successfully.
    committed: list[Path] = field(default_factory=list)

    def final_path(self, staged: str | Path) -> Path:
        """Where a file written at ``staged`` (inside :attr:`dir`) will be after the commit."""
        return self.final_dir / Path(staged).absolute().relative_to(self.dir)


@contextmanager
def atomic_outputs(out_dir: str | Path) -> Iterator[Staging]:
    """Stage outputs in a temporary folder inside ``out_dir`` and move them into place only on success.

    Raises :class:`~segmap.errors.OutputError` when ``out_dir`` is not writable or a file cannot be moved into
    place. On any exception inside the block nothing is moved and the staging folder is removed.
    """
    final_dir = ensure_writable(out_dir)
    try:
        staging = Staging(Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=final_dir)), final_dir)
    except OSError as e:
        raise OutputError(f"{final_dir}: cannot create a staging folder ({e.strerror or e})") from e
    try:
        yield staging
        _commit(staging)
    finally:
        shutil.rmtree(staging.dir, ignore_errors=True)


def _commit(staging: Staging) -> None:
    files = sorted((p for p in staging.dir.rglob("*") if not p.is_dir()),
                   key=lambda p: (p.name in COMMIT_LAST, str(p.relative_to(staging.dir))))
    for staged in files:
        final = staging.final_path(staged)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.is_dir():
                raise IsADirectoryError(21, "a folder of that name is in the way")
            os.replace(staged, final)
        except OSError as e:
            raise OutputError(f"{final}: cannot move the output into place ({e.strerror or e})") from e
        staging.committed.append(final)
