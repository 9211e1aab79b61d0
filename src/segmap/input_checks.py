"""Checks every loaded image passes before it reaches the model: finite voxel values and an affordable size.

Non-finite voxels (NaN, +inf, -inf) occur in float NIfTI files written by other tools (a division by zero in a
bias-field correction, a masked region stored as NaN). nnU-Net does not guard against them: one NaN makes the
intensity statistics and the clipping bounds NaN, the network sees NaN everywhere and the argmax is background, so
the result is an empty mask with a normal exit. segmap replaces them instead, with a warning that counts them:

- NaN and -inf become the smallest finite value of the image, +inf the largest. The smallest value is the background
  of a CT (air) and of an MR (zero signal), so a NaN hole is read as "nothing here", which is what a missing
  measurement is; every finite voxel keeps its value, so the rest of the image is segmented exactly as nnU-Net would.
- An image without a single finite voxel is refused (:class:`~segmap.errors.InputError`): there is nothing to
  segment and no value to put in.

Sizes: a header can declare far more voxels than the file holds or the machine can store (Rows = Columns = 60000).
:func:`check_allocation` compares a size with the memory available to this process (the cgroup limit in a
container, else the kernel's MemAvailable) before the array is allocated, so the user gets one line naming the file
instead of a MemoryError traceback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

#: Part of the available memory one decoded image may take before it is refused. The whole of it: the check is
#: there for headers that are wrong by orders of magnitude; a real image that nearly fits is left to try.
MEMORY_SHARE = 1.0


def replace_nonfinite(array: np.ndarray, what: str) -> tuple[np.ndarray, int]:
    """``array`` with NaN/-inf set to its smallest finite value and +inf to its largest, and how many were replaced.

    Integer arrays are returned as they are (they cannot hold non-finite values). The replacement is done in place
    when ``array`` is writeable. ``what`` names the image in the warning and in the error for an image without any
    finite voxel.
    """
    if not np.issubdtype(array.dtype, np.floating):
        return array, 0
    finite = np.isfinite(array)
    count = int(array.size - np.count_nonzero(finite))
    if count == 0:
        return array, 0
    if count == array.size:
        raise InputError(f"{what}: no voxel has a finite value (all {count} are NaN or infinite); "
                         "there is nothing to segment")
    values = array[finite]
    low, high = values.min(), values.max()
    if not array.flags.writeable:
        array = array.copy()
    nan, pos = np.isnan(array), np.isposinf(array)
    n_nan, n_pos = int(np.count_nonzero(nan)), int(np.count_nonzero(pos))
    array[~finite & ~pos] = low  # NaN and -inf
    array[pos] = high
    log.warning("%s: %d voxel(s) are not finite (%d NaN, %d +inf, %d -inf); set NaN and -inf to the image minimum "
                "%g and +inf to the maximum %g (treated as background)", what, count, n_nan, n_pos,
                count - n_nan - n_pos, float(low), float(high))
    return array, count


def available_memory() -> int | None:
    """Bytes this process can still allocate: the tighter of the cgroup's limit minus its usage and MemAvailable."""
    candidates = []
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            candidates.append(max(0, int(limit) - usage))
        break
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    if not candidates and hasattr(os, "sysconf"):
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(candidates) if candidates else None


def check_allocation(nbytes: int, what: str, declared: str) -> None:
    """Refuse (one line) an image of ``nbytes`` that would take more than :data:`MEMORY_SHARE` of the available
    memory (nothing is refused when the available memory cannot be found out). ``what`` names the file or series, ``declared`` says what its header declares (e.g. "60000 x 60000 x 3
    voxels")."""
    available = available_memory()
    if available is None or nbytes <= MEMORY_SHARE * available:
        return
    raise InputError(f"{what}: its header declares {declared}, {_gib(nbytes)} once decoded, but only "
                     f"{_gib(available)} of memory is available; is the header damaged?")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
