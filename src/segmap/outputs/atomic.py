"""All-or-nothing outputs: a run's files appear in the output folder only when the whole run succeeded.

Usage::

    out = ensure_writable(output_folder)          # early, before inference: fail fast on a bad output folder
    ...
    with atomic_outputs(out, commit_last=("run_report.json",)) as staging:
        write_seg(..., staging.dir / "seg.dcm")
        report.write(staging.dir / "run_report.json")
    # here every file is in `out`; staging.committed lists their final paths

The staging folder is a hidden ``.segmap-staging-*`` directory created *inside* the output folder, so the final
``os.replace`` of each file is a rename on one file system: atomic per file, no copy, and no extra space needed.
If the ``with`` block raises (including KeyboardInterrupt), the staging folder is deleted and the output folder is
left exactly as it was. On success, files are moved in sorted path order with the names in ``commit_last`` (the run
report) last, so a consumer that waits for the report sees every other file already in place; same-named files from an earlier run
are replaced. Sub-folders are recreated in the output folder.

One run per output folder. :func:`claim_output_folder` (called once at the start of a run) takes an exclusive
``flock`` on the output folder itself, held until the process ends or :func:`release_output_folder`; a second run
into the same folder fails at once with a line naming it, instead of both succeeding and the last writer silently
winning. The lock is on the folder's own file descriptor, so no lock file is left behind (on a file system that
cannot lock a folder, NFS, on a hidden ``.segmap-lock`` file; with no working locks at all, a warning says so and
the run goes on unguarded); the kernel drops it when the process dies, however it dies. Holding the lock, the run then removes ``.segmap-staging-*`` folders left
by a run that was killed outright (SIGKILL, power loss): no other run can be writing them. SIGTERM is handled
like Ctrl-C (see :mod:`segmap.signals`), so the ``with`` block's clean-up runs and nothing is left.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import InputError, OutputError

log = logging.getLogger(__name__)

STAGING_PREFIX = ".segmap-staging-"
#: Lock file, only where the output folder itself cannot be locked (see :func:`claim_output_folder`).
LOCK_FILE = ".segmap-lock"


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


#: Output folder (absolute, resolved) -> the open descriptor holding its lock, for this process.
_LOCKS: dict[Path, int] = {}


def claim_output_folder(folder: str | Path, *, input_path: str | Path | None = None) -> Path:
    """Make ``folder`` this run's output folder: create it, prove it writable, lock it, clear stale staging.

    ``input_path``: checked to exist first, so a mistyped input does not leave an empty output folder behind
    (:class:`~segmap.errors.InputError`). Raises :class:`~segmap.errors.OutputError` naming the folder when it is
    not writable or another process holds its lock. Claiming a folder this process already holds is a no-op.
    Returns the folder as an absolute path.
    """
    if input_path is not None and not Path(input_path).exists():
        raise InputError(f"input {input_path} does not exist")
    folder = ensure_writable(folder)
    key = folder.resolve()
    if key in _LOCKS:
        return folder
    try:
        fd = _lock(key)
    except _Busy:
        raise OutputError(f"{folder}: another segmap run is writing into this output folder; wait for it to finish "
                          "or choose another output folder") from None
    except OSError as e:
        # A file system without working locks (some network or FUSE mounts): run, but say what is not guarded.
        log.warning("%s: cannot lock the output folder (%s); a concurrent run into it would not be detected, and "
                    "staging folders of killed runs are left alone", folder, e.strerror or e)
        return folder
    _LOCKS[key] = fd
    remove_stale_staging(folder)
    return folder


class _Busy(Exception):
    """Another process holds the output folder's lock."""


def _lock(folder: Path) -> int:
    """An open descriptor holding an exclusive flock on ``folder``: on the folder itself, or where that is not
    supported (NFS needs a descriptor open for writing) on a hidden ``.segmap-lock`` file in it."""
    def take(fd: int) -> int:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _Busy() from None
            raise
        return fd

    try:
        return take(os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)))
    except _Busy:
        raise
    except OSError:
        return take(os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644))


def release_output_folder(folder: str | Path) -> None:
    """Release the lock :func:`claim_output_folder` took (the end of the process releases it too)."""
    fd = _LOCKS.pop(Path(folder).absolute().resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock


def claimed_folders() -> list[Path]:
    """The output folders this process holds (:func:`claim_output_folder`)."""
    return list(_LOCKS)


def staging_folders(folder: Path) -> list[Path]:
    """The ``.segmap-staging-*`` folders in ``folder`` and one level down (per-study folders), sorted."""
    return sorted([*folder.glob(STAGING_PREFIX + "*"), *folder.glob("*/" + STAGING_PREFIX + "*")])


def remove_stale_staging(folder: str | Path) -> list[Path]:
    """Remove ``.segmap-staging-*`` folders in ``folder``; call only while holding its lock (then they are stale:
    left by a run that was killed outright), also one level down (the per-study folders of a multi-study run).
    Returns the removed paths."""
    removed = []
    folder = Path(folder)
    for stale in staging_folders(folder):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    if removed:
        log.warning("%s: removed %d staging folder(s) left by an earlier run that was killed (%s)", folder,
                    len(removed), ", ".join(str(p.relative_to(folder)) for p in removed))
    return removed


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
def atomic_outputs(out_dir: str | Path, *, commit_last: tuple[str, ...] = ()) -> Iterator[Staging]:
    """Stage outputs in a temporary folder inside ``out_dir`` and move them into place only on success; files named
    in ``commit_last`` (the run report) are moved after all others.

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
        _commit(staging, commit_last)
    finally:
        shutil.rmtree(staging.dir, ignore_errors=True)


def _commit(staging: Staging, commit_last: tuple[str, ...]) -> None:
    files = sorted((p for p in staging.dir.rglob("*") if not p.is_dir()),
                   key=lambda p: (p.name in commit_last, str(p.relative_to(staging.dir))))
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
