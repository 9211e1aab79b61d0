"""One patient, one study, one frame of reference per result: how a DICOM input is split and guarded by study.

A hospital export folder often holds more than one study: two patients, or today's study and a prior. Choosing
series across the whole folder would mix them (patient A's T1C with patient B's T2W, or the 2020 prior instead of
today's scan). The rules:

- :func:`split_by_study` divides a scan into one :class:`~segmap.dicom.loading.DicomScan` per StudyInstanceUID;
  series selection then runs inside each study, so the channels of one model input come from one study (a run
  processes the studies one by one, :mod:`segmap.run.studies`);
- :func:`refuse_several_studies` (called by series selection) refuses to choose among candidates of several
  studies; :func:`check_one_study` is the guard on the chosen series themselves: one StudyInstanceUID, one patient,
  and one FrameOfReferenceUID (resampling one series onto another's grid is only meaningful in a shared frame of
  reference), else :class:`~segmap.errors.InputError` naming the studies / frames (never the patient).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from ..errors import InputError
from .loading import DicomScan, DicomSeries

log = logging.getLogger(__name__)


def split_by_study(scan: DicomScan) -> list[DicomScan]:
    """One scan per StudyInstanceUID (in study UID order, as the scan orders its series). Skipped files are listed
    with every study's scan, since they cannot be attributed to one."""
    studies: dict[str, list[DicomSeries]] = {}
    for s in scan.series:
        studies.setdefault(s.study_instance_uid, []).append(s)
    return [DicomScan(scan.folder, series, list(scan.skipped), scan.files_seen) for series in studies.values()]


def refuse_several_studies(scan: DicomScan, candidates: list[DicomSeries]) -> None:
    """Refuse to select among ``candidates`` (the series matching a task's rules) when they lie in several studies:
    which study is meant cannot be guessed (today's or the prior, patient A or B). A run over such an input splits it
    with :func:`split_by_study` first and never gets here."""
    studies = sorted({s.study_instance_uid for s in candidates})
    if len(studies) > 1:
        raise InputError(f"{scan.folder} holds {len(studies)} studies with series that match the task's rules "
                         f"({', '.join(studies)}); one result must come from one study: process each study on "
                         "its own")


def check_one_study(selections: Mapping[str, Any]) -> None:
    """Refuse chosen series (modality key -> :class:`~segmap.dicom.selection.SeriesSelection`) that span studies,
    patients or frames of reference. A blank FrameOfReferenceUID (de-identified data) is let through with a warning
    when the other series agree."""
    by_study: dict[str, list[str]] = {}
    patients: dict[str, list[str]] = {}
    frames: dict[str, list[str]] = {}
    for key, sel in selections.items():
        series = sel.series
        by_study.setdefault(series.study_instance_uid, []).append(key)
        patients.setdefault(_first_text(series, "PatientID"), []).append(key)
        frames.setdefault(_first_text(series, "FrameOfReferenceUID"), []).append(key)
    if len(by_study) > 1:
        raise InputError("the series chosen for one model input come from different studies ("
                         + "; ".join(f"{', '.join(keys)}: study {uid}" for uid, keys in by_study.items())
                         + "); channels of one input must come from one study")
    if len(patients) > 1:  # one study UID and two patients: a broken export; the IDs themselves are not shown
        raise InputError(f"the series chosen in study {next(iter(by_study))} belong to {len(patients)} different "
                         "patients (PatientID differs); the study is inconsistent")
    named = {uid: keys for uid, keys in frames.items() if uid}
    if len(named) > 1:
        raise InputError("the series chosen for one model input lie in different frames of reference ("
                         + "; ".join(f"{', '.join(keys)}: {uid}" for uid, keys in named.items())
                         + "); they cannot be put on one grid")
    if "" in frames and len(selections) > 1:
        log.warning("modality(ies) %s have no FrameOfReferenceUID; assuming they share the frame of reference of "
                    "the others (same study)", ", ".join(frames[""]))


# ---- helpers


def _first_text(series: DicomSeries, keyword: str) -> str:
    for inst in series.instances:
        value = inst.dataset.get(keyword)
        if value not in (None, ""):
            return str(value).strip()
    return ""
