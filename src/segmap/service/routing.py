"""Which MAPs a complete series is a job for.

A series becomes a job for each configured MAP whose task's ``Rules_Text`` select it (the same selection code a
MAP runs on its input, :mod:`segmap.dicom.selection`) and whose optional trigger holds. Never a trigger, with the
reason logged: anything that is not an image (SEG, RTSTRUCT, presentation states, SR, ... -- which also keeps the
service from looping on its own output), and anything segmap produced -- recognised by the job store (the SEG
series UIDs of our jobs) and by the Manufacturer our writer puts in every SEG.

Multi-modality tasks need several series of a study; routing works per series, so such a MAP is routed on its
first modality's rules only when the MAP's input holds the whole study -- not supported yet: it is refused at start
with the reason (see :func:`check_routable`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from segmap.dicom.loading import NON_IMAGE_MODALITIES, DicomScan
from segmap.dicom.selection import select_series
from segmap.errors import SegmapError, ServiceConfigError
from segmap.outputs.seg import MANUFACTURER as OUR_MANUFACTURER
from segmap.tasks import SegmentationTask

from .config import MapConfig


@dataclass(frozen=True)
class Route:
    """The decision for one MAP: a job (``matched``) or why not."""

    map_name: str
    matched: bool
    reason: str


def check_routable(maps: Sequence[MapConfig], tasks: Mapping[str, SegmentationTask]) -> None:
    for i, m in enumerate(maps):
        task = tasks[m.name]
        if len(task.modalities) != 1:
            raise ServiceConfigError(f"maps[{i}] ({m.name}): task '{task.name}' needs {len(task.modalities)} "
                                     f"modalities; the service routes single series, so only single-modality tasks "
                                     f"can be triggered")


def not_a_trigger(scan: DicomScan, is_our_output: Callable[[str], bool]) -> str | None:
    """Why this series can never start a job (None when it may)."""
    if not scan.series:
        return "no readable DICOM instance"
    uids = {s.series_instance_uid for s in scan.series}
    if len(uids) != 1:
        return f"{len(uids)} series where one was expected"
    series = scan.series[0]
    modality = series.modality.upper()
    if modality in NON_IMAGE_MODALITIES:
        return f"modality {modality or '?'} is not an image series (never a trigger)"
    if is_our_output(series.series_instance_uid):
        return "it is the output of one of our jobs"
    manufacturers = {str(inst.dataset.get("Manufacturer", "")).strip().lower() for inst in series.instances}
    if OUR_MANUFACTURER in manufacturers:
        return f"it was made by {OUR_MANUFACTURER} (Manufacturer)"
    if not series.is_image:
        return "its instances have no pixel rows/columns (not an image series)"
    return None


def route(scan: DicomScan, maps: Sequence[MapConfig], tasks: Mapping[str, SegmentationTask],
          is_our_output: Callable[[str], bool]) -> list[Route]:
    """One :class:`Route` per MAP for the single series in ``scan``."""
    never = not_a_trigger(scan, is_our_output)
    if never:
        return [Route(m.name, False, never) for m in maps]
    series = scan.series[0]
    routes = []
    for m in maps:
        modality = tasks[m.name].modalities[0]
        try:
            chosen = select_series(scan, modality.rules, modality_key=modality.key)
        except SegmapError as e:
            routes.append(Route(m.name, False, f"task rules do not select it: {e}"))
            continue
        if chosen.series.series_instance_uid != series.series_instance_uid:
            routes.append(Route(m.name, False, "task rules select another stack"))
            continue
        if m.trigger is not None:
            values = {str(inst.dataset.get(m.trigger.tag, "") or "") for inst in series.instances}
            if not any(m.trigger.contains.lower() in v.lower() for v in values):
                routes.append(Route(m.name, False, f"trigger {m.trigger.tag} does not contain "
                                                   f"{m.trigger.contains!r}"))
                continue
        routes.append(Route(m.name, True, f"selected by '{chosen.selection_name}'"))
    return routes

