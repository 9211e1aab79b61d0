"""Every path under the service's workdir, in one place::

    WORKDIR/
      store.sqlite              the job store (unless service.database names a PostgreSQL)
      spool/STUDY/SERIES/SOP.dcm   received instances (:mod:`.spool`)
      series/ID/SOP.dcm         a series version's input: hard links to its spool files
      jobs/RUN/output/          what the MAP wrote (RUN is the job's run name, :func:`.keys.run_name`)
      jobs/RUN/run.log          the container's log, one section per attempt

Retention (:meth:`Workspace.remove_tree`, :meth:`Workspace.remove_spool_files`) deletes a finished job's
``output/`` and its version's ``series/ID`` and spool files; ``run.log`` stays with the job record. The free-space
floor (:meth:`Workspace.below_floor`) and the workdir gauge (:meth:`Workspace.usage_bytes`) read the same root.

Several workers share one workdir (the Kubernetes runner mounts it into every MAP pod), so every path is derived
from the job's identity, never from the process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable


class Workspace:
    """The layout of one workdir (``root``); creates nothing until :meth:`create`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.store_path = self.root / "store.sqlite"
        self.spool_dir = self.root / "spool"
        self.jobs_dir = self.root / "jobs"
        self.series_root = self.root / "series"

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    def series_dir(self, series_id: int) -> Path:
        """The input folder of series version ``series_id`` (what a MAP run reads)."""
        return self.series_root / str(series_id)

    def output_dir(self, run_name: str) -> Path:
        return self.jobs_dir / run_name / "output"

    def log_path(self, run_name: str) -> Path:
        return self.jobs_dir / run_name / "run.log"

    def create(self) -> None:
        for d in (self.root, self.spool_dir, self.jobs_dir, self.series_root):
            d.mkdir(parents=True, exist_ok=True)

    def link_series(self, series_id: int, files: Iterable[tuple[str, str]]) -> Path:
        """The version's input folder filled with ``(sop_uid, spool path)`` (see :func:`link_files`)."""
        return link_files(self.series_dir(series_id), ((f"{sop_uid}.dcm", path) for sop_uid, path in files))

    # -------------------------------------------------------------------------------- free space and retention
    def free_bytes(self) -> int:
        """Free space (bytes, for an unprivileged process) on the file system that holds the workdir."""
        return shutil.disk_usage(self.root).free

    def below_floor(self, floor_bytes: float) -> bool:
        """True when less than ``floor_bytes`` are free where the workdir lies (the listener refuses instances
        and the Orthanc follower pauses while it is; the job store still commits). A floor of 0: never."""
        return floor_bytes > 0 and self.free_bytes() < floor_bytes

    def usage_bytes(self) -> int:
        """Bytes of the files under the workdir (each hard-linked file once): the workdir gauge."""
        seen, total = set(), 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                try:
                    st = os.lstat(os.path.join(folder, name))
                except OSError:  # deleted meanwhile
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
        return total

    def remove_tree(self, folder: str | Path) -> None:
        """Delete ``folder`` (a job's output, a version's input) -- only ever one under the workdir."""
        folder = Path(folder)
        if folder.resolve().is_relative_to(self.root.resolve()) and folder.resolve() != self.root.resolve():
            shutil.rmtree(folder, ignore_errors=True)

    def remove_spool_files(self, paths: Iterable[str]) -> None:
        """Delete spool files (and the study/series folders they leave empty); paths outside the spool are left
        alone."""
        spool = self.spool_dir.resolve()
        for p in paths:
            path = Path(p)
            if not path.resolve().is_relative_to(spool):
                continue
            path.unlink(missing_ok=True)
            for parent in (path.parent, path.parent.parent):
                if parent.resolve() == spool:
                    break
                try:
                    parent.rmdir()
                except OSError:  # not empty (or gone)
                    break


def link_files(folder: Path, files: Iterable[tuple[str, str | Path]]) -> Path:
    """``folder`` holding each ``(name, source)`` as a hard link (a copy across file systems); each file appears
    whole (temp name, then rename), so a crash never leaves half of one; names already there are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in files:
        target = folder / name
        if target.exists():
            continue
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return folder


def fresh_folder(folder: Path) -> None:
    """``folder`` empty (an earlier attempt's output removed)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def append_attempt_log(path: Path, attempt: int, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"=== attempt {attempt} ===\n{text}\n")


def log_tail(path: str | Path | None, tail: int = 200) -> list[str]:
    """The last ``tail`` lines of a job's container log; [] when it was not written (yet)."""
    if not path or not Path(path).is_file():
        return []
    return Path(path).read_text(errors="replace").splitlines()[-tail:]
