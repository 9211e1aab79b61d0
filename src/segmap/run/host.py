"""How a run uses the machine it runs on: CPU threads, memory and the file-mode mask of its outputs.

The measurements and the limits themselves live in :mod:`segmap.resources`; this module applies them to a run's
values (the model and the image) at the moments a run needs them.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

from ..model import MonetModel
from ..engine.memory import peak_memory_for
from ..resources import apply_threads, apply_umask, check_memory
from .values import InputImage

log = logging.getLogger("segmap")


def use_threads(threads: int | str | None) -> int:
    """Size the thread pools (the ``threads`` setting, else the CPU quota); logs and returns the count."""
    count = apply_threads(threads)
    log.info("using %d CPU thread(s)", count)
    return count


def check_memory_for(image: InputImage, model: MonetModel) -> int:
    """Estimate the run's peak memory (:func:`segmap.engine.memory.peak_memory_for`), log it, and refuse the run
    with :class:`~segmap.errors.MemoryLimitError` when it exceeds the container's memory limit."""
    shape = image.volume.array.shape
    estimate = peak_memory_for(model.spec, shape, image.volume.spacing_zyx,
                               model_bytes=sum(f.stat().st_size for f in model.fold_files))
    check_memory(estimate, what=f"segmenting a {' x '.join(str(v) for v in shape[1:])} volume")
    return estimate


@contextmanager
def patient_data_umask(umask: str | int | None) -> Iterator[None]:
    """The ``umask`` setting in force while the block writes outputs (they hold patient data: 0640 by default),
    the process's own mask again afterwards."""
    old = apply_umask(umask)
    try:
        yield
    finally:
        os.umask(old)
