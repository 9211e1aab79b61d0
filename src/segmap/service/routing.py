"""Which MAPs a complete series is a job for, and the checks of the MAPs made before serving.

A series becomes a job for each configured MAP whose task's ``Rules_Text`` select it (the same selection code a
MAP runs on its input, :mod:`segmap.dicom.selection`) and whose optional trigger holds. Never a trigger, with the
reason logged: anything that is not an image (SEG, RTSTRUCT, presentation states, SR, ... -- which also keeps the
service from looping on its own output), and anything segmap produced -- recognised by the job store (the SEG
series UIDs of our jobs) and by the Manufacturer our writer puts in every SEG.

A MAP whose task has several modalities is never a job for one series: its series only say which modality they
may fill, and the study they belong to is looked at as a whole once it is quiet (:mod:`.studies`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from segmap.dicom.loading import NON_IMAGE_MODALITIES, DicomScan, DicomSeries
from segmap.dicom.selection import select_series
from segmap.errors import SegmapError, ServiceConfigError
from segmap.outputs.seg import MANUFACTURER as OUR_MANUFACTURER
from segmap.tasks import SegmentationTask, load_task
from segmap.text import first_line

from .config import MapConfig


@dataclass(frozen=True)
class Route:
    """The decision for one MAP: a job (``matched``) or why not."""

    map_name: str
    matched: bool
    reason: str


def load_routable_tasks(maps: Sequence[MapConfig]) -> dict[str, SegmentationTask]:
    """MAP name -> its task: what ``segmap serve`` loads and checks of its MAPs before it serves, and what ``segmap
    serve --check`` runs too. Any task whose modalities all have DICOM rules is routable (one modality: per series;
    several: per study, :mod:`.studies`); the configuration reader already refused a task without rules."""
    tasks = {}
    for i, m in enumerate(maps):
        try:
            tasks[m.name] = load_task(m.task, m.task_name)
        except SegmapError as e:
            raise ServiceConfigError(f"maps[{i}] ({m.name}): {first_line(e)}") from None
    return tasks


def trigger_holds(series: DicomSeries, m: MapConfig) -> bool:
    """Whether the MAP's optional trigger holds on ``series`` (always without a trigger)."""
    if m.trigger is None:
        return True
    values = {str(inst.dataset.get(m.trigger.tag, "") or "") for inst in series.instances}
    return any(m.trigger.contains.lower() in v.lower() for v in values)


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
        task = tasks[m.name]
        if len(task.modalities) > 1:
            routes.append(_study_route(scan, series, m, task))
            continue
        modality = task.modalities[0]
        try:
            chosen = select_series(scan, modality.rules, modality_key=modality.key)
        except SegmapError as e:
            routes.append(Route(m.name, False, f"task rules do not select it: {e}"))
            continue
        if chosen.series.series_instance_uid != series.series_instance_uid:
            routes.append(Route(m.name, False, "task rules select another stack"))
            continue
        if not trigger_holds(series, m):
            routes.append(Route(m.name, False, f"trigger {m.trigger.tag} does not contain {m.trigger.contains!r}"))
            continue
        routes.append(Route(m.name, True, f"selected by '{chosen.selection_name}'"))
    return routes


def _study_route(scan: DicomScan, series: DicomSeries, m: MapConfig, task: SegmentationTask) -> Route:
    """A multi-modality MAP: never a series job; which modalities the series may fill (the study decides)."""
    fits = []
    for modality in task.modalities:
        try:
            select_series(scan, modality.rules, modality_key=modality.key)
        except SegmapError:
            continue
        fits.append(modality.key)
    if not fits:
        return Route(m.name, False, "study-level MAP: no modality's rules select it")
    return Route(m.name, False, f"study-level MAP: may fill {', '.join(repr(k) for k in fits)}; decided with its "
                                f"study {series.study_instance_uid}")

