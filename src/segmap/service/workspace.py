"""Every path under the service's workdir, in one place::

    WORKDIR/
      store.sqlite              the job store (unless service.database names a PostgreSQL)
      spool/STUDY/SERIES/SOP.dcm   received instances (:mod:`.spool`)
      series/ID/SOP.dcm         a series version's input: hard links to its spool files
      jobs/RUN/output/          what the MAP wrote (RUN is the job's run name, :func:`.keys.run_name`)
      jobs/RUN/run.log          the container's log, one section per attempt

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
        """The version's input folder filled with ``(sop_uid, spool path)`` as hard links (copies across file
        systems); each file appears whole (temp name, then rename), so a crash never leaves half of one."""
        folder = self.series_dir(series_id)
        folder.mkdir(parents=True, exist_ok=True)
        for sop_uid, path in files:
            target = folder / f"{sop_uid}.dcm"
            if target.exists():
                continue
            tmp = folder / f".{sop_uid}.{os.getpid()}.tmp"
            tmp.unlink(missing_ok=True)
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
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
