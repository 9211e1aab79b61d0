"""What the container (or host) gives a run: CPUs, memory, file mode.

A PACS job service runs several MAP containers at once, each with ``--cpus N --memory M``. Two things go wrong
without this module:

* torch and OpenMP start one thread per *host* core whatever the CPU quota is, so four containers limited to one
  CPU each on a 2-core host run 4 x 2 threads that the kernel throttles in turn: slower than running them one
  after another. :func:`cpu_budget` reads the cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us``) and the CPU affinity; :func:`apply_threads` sets torch's and OpenMP's thread counts to it
  (or to the ``threads`` setting when that is not 0).
* a run larger than the memory limit is killed by the kernel (exit 137, no message). The engine predicts the
  peak from the volume and model (:func:`segmap.engine.memory.estimate_peak_memory`), :func:`memory_limit` reads
  the cgroup limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) and :func:`check_memory` refuses a run that
  cannot fit, before inference, with one line naming both figures.

Everything takes the cgroup and proc roots as arguments so that tests can point them at fake files.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

from .errors import MemoryLimitError, SegmapError

log = logging.getLogger("segmap")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
#: Environment variables the OpenMP/BLAS runtimes read when they start their thread pools.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: v1 reports "no limit" as a huge page-rounded number; anything above this is no limit.
_V1_UNLIMITED = 1 << 60



def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def _cgroup_dirs(root: Path, proc_cgroup: Path, controller: str) -> list[Path]:
    """The folders holding this process's cgroup files for ``controller``, innermost first, up to ``root``.

    In a container (its own cgroup namespace) /proc/self/cgroup says ``/`` and the files are at the root; on a host
    or with a shared namespace they are under the listed path, and every ancestor can carry a tighter limit.
    """
    candidates: list[Path] = []
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # cgroup v2 unified hierarchy
            base = root
        elif controller in controllers.split(","):
            base = next((root / name for name in (controllers, controller, "cpu,cpuacct", "cpuacct,cpu")
                         if (root / name).is_dir()), root / controller)
        else:
            continue
        d = base / rel.lstrip("/")
        while True:
            candidates.append(d)
            if d == base or base not in d.parents:
                break
            d = d.parent
    if not candidates:  # no /proc/self/cgroup (not Linux, or hidden): look at the usual places
        candidates = [root, root / controller, root / "cpu,cpuacct"]
    return candidates


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """CPUs the cgroup quota allows (e.g. 1.5 for ``--cpus 1.5``), the tightest along the hierarchy; None without
    a quota."""
    found: list[float] = []
    for d in _cgroup_dirs(root, proc_cgroup, "cpu"):
        v2 = _read(d / "cpu.max")
        if v2:
            quota, _, period = v2.partition(" ")
            if quota != "max" and quota.isdigit() and period.strip().isdigit() and int(period) > 0:
                found.append(int(quota) / int(period))
            continue
        quota_v1, period_v1 = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if quota_v1 and period_v1 and quota_v1.lstrip("-").isdigit() and period_v1.isdigit():
            if int(quota_v1) > 0 and int(period_v1) > 0:
                found.append(int(quota_v1) / int(period_v1))
    return min(found) if found else None


def cpu_affinity() -> int:
    """CPUs this process may run on (``taskset``, ``docker run --cpuset-cpus``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_budget(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP, affinity: int | None = None) -> int:
    """Threads worth running: the CPU affinity, lowered to the cgroup quota rounded down (at least 1). Rounding
    down: a thread more than the quota is throttled for the rest of each period, which costs more than the part of
    a CPU it would add."""
    cpus = cpu_affinity() if affinity is None else affinity
    quota = cpu_quota(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, int(math.floor(quota + 1e-9)))
    return max(1, cpus)


def resolve_threads(setting: int | str | None, **kwargs) -> int:
    """The ``threads`` setting: a positive number as given; 0, ``auto`` or None the :func:`cpu_budget`."""
    if setting in (None, "", "auto", 0, "0"):
        return cpu_budget(**kwargs)
    try:
        n = int(setting)
    except (TypeError, ValueError):
        raise SegmapError(f"threads {setting!r}: expected a whole number (0 or auto: follow the CPU quota)") from None
    if n < 0:
        raise SegmapError(f"threads {setting!r}: expected 0 (auto) or a positive number")
    return n or cpu_budget(**kwargs)


def apply_threads(setting: int | str | None = None, environ: dict | None = None) -> int:
    """Set the thread count of every pool a run uses; returns it.

    Before torch is imported, the environment is what counts (OpenMP reads ``OMP_NUM_THREADS`` when it starts):
    the variables are set unless the user set them. Once torch is imported, its intra-op pool is resized too.
    An explicit ``threads`` setting wins over the variables already set.
    """
    env = os.environ if environ is None else environ
    explicit = setting not in (None, "", "auto", 0, "0")
    n = resolve_threads(setting)
    if not explicit and env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        n = int(env["OMP_NUM_THREADS"])  # the user's OpenMP setting stands when segmap's is auto
    for name in THREAD_ENV:
        if explicit or not env.get(name):
            env[name] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None and environ is None:
        try:
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)
        except RuntimeError:  # pragma: no cover - some builds refuse once the pool runs
            pass
    return n


def apply_umask(setting: str | int | None) -> int:
    """Set the process umask from the ``umask`` setting (octal text such as ``027``); returns the old one."""
    if setting is None or setting == "":
        return os.umask(os.umask(0))
    try:
        value = int(str(setting), 8) if isinstance(setting, str) else int(setting)
    except ValueError:
        raise SegmapError(f"umask {setting!r}: expected an octal mode such as 027") from None
    if not 0 <= value <= 0o777:
        raise SegmapError(f"umask {setting!r}: expected an octal mode between 000 and 777")
    return os.umask(value)


# --------------------------------------------------------------------------------------------- memory


def memory_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int | None:
    """The cgroup memory limit in bytes, the tightest along the hierarchy; None without one."""
    found: list[int] = []
    for d in _cgroup_dirs(root, proc_cgroup, "memory"):
        v2 = _read(d / "memory.max")
        if v2 is not None:
            if v2.isdigit():
                found.append(int(v2))
            continue
        v1 = _read(d / "memory.limit_in_bytes")
        if v1 and v1.isdigit() and int(v1) < _V1_UNLIMITED:
            found.append(int(v1))
    return min(found) if found else None


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_memory(estimate: int, limit: int | None = None, *, what: str = "this run") -> None:
    """Refuse ``what`` when its ``estimate`` exceeds the memory ``limit`` (the cgroup's when None); log both."""
    limit = memory_limit() if limit is None else limit
    if limit is None:
        log.info("estimated peak memory %s (no memory limit)", gib(estimate))
        return
    log.info("estimated peak memory %s of the %s memory limit", gib(estimate), gib(limit))
    if estimate > limit:
        raise MemoryLimitError(f"{what} needs an estimated {gib(estimate)} of memory but the container's memory "
                               f"limit is {gib(limit)}: raise the limit (docker run --memory) to at least "
                               f"{math.ceil(estimate / 2**30 * 10) / 10:.1f}g")
