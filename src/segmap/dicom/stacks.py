"""4D and multi-phase series: one Series Instance UID holding several 3D stacks, split apart before selection.

A dynamic (multi-phase) CT, a multi-echo or diffusion MR exports every temporal position, echo or b-value as slices
of one series, at the same positions. Stacked into one volume they mix (InstanceNumber often restarts per phase,
so "the highest Instance Number at each position" takes slices of both). So the scan splits such a series:

- a series is split only when its slice positions repeat (ImagePositionPatient, to 0.01 mm);
- the stacks are told apart by the first attribute of :data:`STACK_ATTRIBUTES` that separates them: its value
  divides the instances into at least two groups of at least two instances each, with no position repeated within a
  group. A series whose repeats no attribute explains keeps its instances together (a re-sent slice is then
  de-duplicated by :mod:`segmap.dicom.series_volume`, which refuses a series where most positions repeat);
- each stack becomes a :class:`~segmap.dicom.loading.DicomSeries` of its own, with the series' UID and
  :attr:`~segmap.dicom.loading.DicomSeries.stack` saying which attribute value it holds.

Selection then sees the stacks as candidates, and a series-selection condition on the distinguishing attribute
picks one (conditions hold for a candidate when all its instances satisfy them), e.g. in the task's Rules_Text::

    {"selections": [{"name": "venous phase", "conditions": {"Modality": "CT", "TemporalPositionIdentifier": 2}}]}

Rule when the task does not pin one: when two or more stacks of one series match the same selection, the run is
refused with a line naming the series, the attribute, its values and the condition to add
(:func:`refuse_ambiguous_stacks`). Which phase a model needs is clinical knowledge that only the task can supply;
guessing "the first" would give a confident mask on the wrong phase.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Sequence

from pydicom.dataset import Dataset

from ..errors import InputError

log = logging.getLogger(__name__)

#: Attributes that distinguish the stacks of one series, in the order they are tried.
STACK_ATTRIBUTES = ("TemporalPositionIdentifier", "TemporalPositionIndex", "EchoNumbers", "DiffusionBValue",
                    "AcquisitionNumber", "TriggerTime", "EchoTime", "InversionTime", "ImageType")


@dataclass(frozen=True)
class Stack:
    """Which part of a split series a :class:`~segmap.dicom.loading.DicomSeries` holds."""

    #: The attribute that tells the stacks apart, e.g. "TemporalPositionIdentifier".
    keyword: str
    #: Its value in this stack, as text ("2", "ORIGINAL\\PRIMARY\\AXIAL"); "" when the instances lack it.
    value: str
    #: All values of the series' stacks, in order (numbers numerically).
    values: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.keyword} {self.value or '(none)'}"

    def condition(self) -> str:
        """The Rules_Text condition that selects this stack."""
        try:
            number = float(self.value)
            text = str(int(number)) if number.is_integer() else str(number)
        except ValueError:
            text = f'"{self.value}"'
        return f'"{self.keyword}": {text}'


def split_stacks(series) -> list:
    """``[series]`` (a :class:`~segmap.dicom.loading.DicomSeries`), or one copy of it per stack when it holds several
    (see the module docstring)."""
    instances = series.instances
    positions = [_position_key(inst.dataset) for inst in instances]
    if any(p is None for p in positions) or len(set(positions)) == len(positions):
        return [series]
    for keyword in STACK_ATTRIBUTES:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, inst in enumerate(instances):
            groups[_text_value(inst.dataset, keyword)].append(i)
        if len(groups) < 2 or min(len(g) for g in groups.values()) < 2:
            continue
        if any(len({positions[i] for i in g}) != len(g) for g in groups.values()):
            continue
        values = tuple(sorted(groups, key=_value_order))
        stacks = [replace(series, instances=[instances[i] for i in groups[v]], stack=Stack(keyword, v, values))
                  for v in values]
        log.info("series %s %r holds %d stacks at the same slice positions, told apart by %s (%s); each is a "
                 "candidate of its own", series.series_instance_uid, series.description, len(stacks), keyword,
                 ", ".join(v or "(none)" for v in values))
        return stacks
    return [series]


def refuse_ambiguous_stacks(modality_key: str, chosen, also_matched: Sequence) -> None:
    """Raise :class:`~segmap.errors.InputError` when ``chosen`` is one stack of a split series and other stacks of
    that series matched the same selection (``also_matched``): the task must say which one it wants."""
    if chosen.stack is None:
        return
    rivals = [s for s in also_matched if s is not chosen and s.stack is not None
              and s.series_instance_uid == chosen.series_instance_uid]
    if not rivals:
        return
    matched = sorted([chosen, *rivals], key=lambda s: _value_order(s.stack.value))
    stack = chosen.stack
    raise InputError(
        f"series {chosen.series_instance_uid} ({chosen.modality} {chosen.description!r}) holds {len(stack.values)} "
        f"stacks at the same positions, told apart by {stack.keyword} ({', '.join(v or '(none)' for v in stack.values)})"
        f", and the rules of modality '{modality_key}' match {len(matched)} of them "
        f"({', '.join(s.stack.describe() for s in matched)}); add a condition such as {matched[0].stack.condition()} "
        "to its Rules_Text to choose one")


def _position_key(ds: Dataset) -> tuple | None:
    # From the raw value where it is still raw: pydicom's DS conversion of every slice of every series costs more
    # than the whole split (the volume step reads positions the same way).
    elem = ds.get_item(0x00200032)
    value = None if elem is None else elem.value
    if isinstance(value, bytes):
        value = value.split(b"\\")
    try:
        return tuple(round(float(v), 2) for v in value) if value is not None and len(value) == 3 else None
    except (TypeError, ValueError):
        return None


def _text_value(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _value_order(value: str) -> tuple:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)
