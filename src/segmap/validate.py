"""Checks that a Segmentation Task and a model describe the same inputs and the same labels.

The task file is the source of truth for what each segment *is* (DICOM codes); the model is the source of truth for
which inputs it takes and which label values it produces. The two are only joined by position: modality ``k`` of the
task is input channel ``k`` of the model, and ``Segments[i-1]`` describes label value ``i``. Nothing else ties them
together, so a reordered or missing entry would silently mislabel a whole segment; this module refuses that.
"""

from __future__ import annotations

from itertools import zip_longest
from pathlib import Path
from typing import Sequence

from .errors import MismatchError
from .model import ModelSpec
from .tasks import SegmentationTask

MISSING = "—"


def side_by_side(left: Sequence[str], right: Sequence[str], *, start: int = 1) -> str:
    """``[1: a | b] [2: c | —]``: two lists paired by position, on one line."""
    return " ".join(f"[{i}: {a} | {b}]"
                    for i, (a, b) in enumerate(zip_longest(left, right, fillvalue=MISSING), start=start))


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _names(task: SegmentationTask, spec: ModelSpec, task_source, model_source) -> tuple[str, str]:
    task_where = f"task '{task.name}' ({task_source if task_source is not None else task.source})"
    model_where = f"model ({model_source})" if model_source is not None else "the model"
    return task_where, model_where


def modality_mismatch(task: SegmentationTask, spec: ModelSpec, *, task_source: str | Path | None = None,
                      model_source: str | Path | None = None) -> str | None:
    """A one-line description of how the task's modality keys differ from the model's inputs, or None."""
    keys = list(task.modality_keys)
    inputs = list(spec.input_names)
    if keys == inputs:
        return None
    task_where, model_where = _names(task, spec, task_source, model_source)
    pairs = side_by_side(keys, inputs)
    if len(keys) != len(inputs):
        head = (f"{task_where} has {_plural(len(keys), 'modality', 'modalities')} but {model_where} takes "
                f"{_plural(len(inputs), 'input')}")
    elif sorted(keys) == sorted(inputs):
        head = f"{task_where} lists its modalities in another order than {model_where} takes its inputs"
    else:
        head = f"{task_where} modality keys differ from the input names of {model_where}"
        if [k.lower() for k in keys] == [n.lower() for n in inputs]:
            head += " (only in upper/lower case; keys are case-sensitive)"
    channels = ", ".join(spec.channel_names)
    return f"{head}: {pairs} (task | model; model channels: {channels})"


def segment_mismatch(task: SegmentationTask, spec: ModelSpec, *, task_source: str | Path | None = None,
                     model_source: str | Path | None = None) -> str | None:
    """A one-line description of how the task's Segments differ from the model's foreground labels, or None."""
    labels = spec.foreground_labels
    values = [v for v, _ in labels]
    task_where, model_where = _names(task, spec, task_source, model_source)
    if values != list(range(1, len(values) + 1)):
        listing = " ".join(f"[{v}: {n}]" for v, n in labels)
        return (f"{model_where} has foreground label values {values}, expected 1..{len(values)} so that "
                f"Segments[i-1] of {task_where} can describe label value i: {listing}")
    if len(task.segments) == len(labels):
        return None
    rows = []
    for i in range(1, max(len(task.segments), len(labels)) + 1):
        seg = task.segments[i - 1].label if i <= len(task.segments) else MISSING
        lab = labels[i - 1][1] if i <= len(labels) else MISSING
        rows.append(f"[{i}: {seg} | {lab}]")
    return (f"{task_where} has {_plural(len(task.segments), 'segment')} but {model_where} has "
            f"{_plural(len(labels), 'foreground label')}: {' '.join(rows)} (label value: task segment | model label)")


def check_agreement(task: SegmentationTask, spec: ModelSpec, *, task_source: str | Path | None = None,
                    model_source: str | Path | None = None) -> None:
    """Raise :class:`MismatchError` unless the task's modalities are the model's inputs (same names, same order)
    and the task has one Segment per foreground label value 1..N."""
    for check in (modality_mismatch, segment_mismatch):
        problem = check(task, spec, task_source=task_source, model_source=model_source)
        if problem:
            raise MismatchError(problem)
