"""One patient, one study, one frame of reference per result; an input of several studies is processed study by study.

A hospital export folder often holds more than one study: two patients, or today's study and a prior. Choosing
series across the whole folder would mix them (patient A's T1C with patient B's T2W, or the 2020 prior instead of
today's scan). The rules:

- :func:`split_by_study` divides a scan into one :class:`~segmap.dicom.loading.DicomScan` per StudyInstanceUID;
  series selection then runs inside each study, so the channels of one model input come from one study;
- :func:`refuse_several_studies` (called by series selection) refuses to choose among candidates of several
  studies; :func:`check_one_study` is the guard on the chosen series themselves: one StudyInstanceUID, one patient, and one
  FrameOfReferenceUID (resampling one series onto another's grid is only meaningful in a shared frame of
  reference), else :class:`~segmap.errors.InputError` naming the studies / frames (never the patient);
- :func:`process_studies` runs a callback per study into its own output subfolder named by
  :func:`study_folder_name` (a hash of the StudyInstanceUID, never patient data); a study that fails is recorded
  and the others still run; :func:`write_summary` writes ``run_summary.json`` at the top, and
  :func:`raise_if_any_failed` ends the run with one line and exit code 2 when any study failed. A single study keeps
  the plain layout (outputs at the top of the output folder, no summary);
- :func:`passed_over` says, for the run report and the log, which candidate series were not chosen and why.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import InputError, SegmapError, StudiesFailed
from .loading import DicomScan, DicomSeries

log = logging.getLogger(__name__)

SUMMARY_NAME = "run_summary.json"
STUDY_FOLDER_PREFIX = "study-"


def split_by_study(scan: DicomScan) -> list[DicomScan]:
    """One scan per StudyInstanceUID (in study UID order, as the scan orders its series). Skipped files are listed
    with every study's scan, since they cannot be attributed to one."""
    studies: dict[str, list[DicomSeries]] = {}
    for s in scan.series:
        studies.setdefault(s.study_instance_uid, []).append(s)
    return [DicomScan(scan.folder, series, list(scan.skipped), scan.files_seen) for series in studies.values()]


def study_folder_name(study_instance_uid: str) -> str:
    """Output subfolder of one study: ``study-`` and 12 hex digits of the SHA-256 of its StudyInstanceUID (the same
    name on every run, different for different studies, and nothing about the patient in it)."""
    return STUDY_FOLDER_PREFIX + hashlib.sha256(study_instance_uid.encode()).hexdigest()[:12]


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


#: Candidates listed per modality in the report before the rest are only counted.
MAX_PASSED_OVER = 50


def passed_over(scan: DicomScan, selections: Mapping[str, Any]) -> dict[str, list[dict]]:
    """For each modality key, the series of ``scan`` not chosen for it and why (for the run report and the log).

    Each entry: ``series_instance_uid``, ``summary`` (modality, number, description, stack, instance count; never
    patient data) and ``reason``: chosen for another modality, not an image series, matched too but another was
    preferred (and by which rule), or the first condition it fails. At most :data:`MAX_PASSED_OVER` per modality,
    then one entry counting the rest.
    """
    chosen_for = {id(sel.series): key for key, sel in selections.items()}
    out: dict[str, list[dict]] = {}
    for key, sel in selections.items():
        entries = []
        for series in scan.series:
            if series is sel.series:
                continue
            if id(series) in chosen_for:
                reason = f"chosen for modality '{chosen_for[id(series)]}'"
            else:
                reason = _why_not(series, sel)
            entries.append({"series_instance_uid": series.series_instance_uid, "summary": series.summary(),
                            "reason": reason})
            log.info("modality '%s': passed over %s: %s", key, series.summary(), reason)
        if len(entries) > MAX_PASSED_OVER:
            entries = entries[:MAX_PASSED_OVER] + [{"more": len(entries) - MAX_PASSED_OVER}]
        out[key] = entries
    return out


@dataclass
class StudyResult:
    """What happened to one study of a multi-study input."""

    study_instance_uid: str
    folder: str
    status: str = "succeeded"
    error: str | None = None
    report: Path | None = None
    series: int = 0

    def as_dict(self, out_dir: Path) -> dict:
        report = None
        if self.report is not None:
            try:
                report = str(Path(self.report).relative_to(out_dir))
            except ValueError:
                report = str(self.report)
        return {"study_instance_uid": self.study_instance_uid, "folder": self.folder, "status": self.status,
                "error": self.error, "report": report, "series": self.series}


def process_studies(scan: DicomScan, out_dir: Path,
                    process_one: Callable[[DicomScan, Path], Path | None]) -> list[StudyResult]:
    """Call ``process_one(study_scan, study_out_dir)`` for each study, into ``out_dir`` itself when there is one
    study and into ``out_dir/study-<hash>`` otherwise; ``process_one`` returns the study's report path.

    A study whose processing raises an :class:`Exception` is recorded as failed (its error's first line) and the
    next study runs; :class:`BaseException` (Ctrl-C, SIGTERM) stops everything.
    """
    out_dir = Path(out_dir)
    studies = split_by_study(scan)
    if len(studies) > 1:
        log.info("%d studies in %s: processing them one by one, each into its own output folder (%s)", len(studies),
                 scan.folder, ", ".join(f"{study_folder_name(s.series[0].study_instance_uid)} = study "
                                        f"{s.series[0].study_instance_uid}" for s in studies))
    results = []
    for study in studies:
        uid = study.series[0].study_instance_uid
        single = len(studies) == 1
        result = StudyResult(uid, "." if single else study_folder_name(uid), series=len(study.series))
        target = out_dir if single else out_dir / result.folder
        try:
            result.report = process_one(study, target)
        except Exception as e:  # noqa: BLE001 - one study's failure must not stop the others
            if single:
                raise
            result.status = "failed"
            lines = str(e).strip().splitlines()
            result.error = (lines[0] if lines else "") if isinstance(e, SegmapError) else \
                f"internal error: {type(e).__name__}: {lines[0] if lines else ''}"
            log.error("study %s (%s) failed: %s", uid, result.folder, result.error)
        finally:
            if not single:
                _close_study_folder(target)
        results.append(result)
    return results


def summary(results: list[StudyResult], out_dir: Path) -> dict:
    """The top-level ``run_summary.json`` document of a multi-study run."""
    from .. import __version__

    failed = [r for r in results if r.status != "succeeded"]
    return {
        "segmap_version": __version__,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="milliseconds"),
        "status": "succeeded" if not failed else ("failed" if len(failed) == len(results) else "partly failed"),
        "studies_total": len(results),
        "studies_failed": len(failed),
        "studies": [r.as_dict(Path(out_dir)) for r in results],
    }


def write_summary(results: list[StudyResult], out_dir: Path) -> Path:
    """Write ``run_summary.json`` into ``out_dir`` atomically (temporary file + rename)."""
    path = Path(out_dir) / SUMMARY_NAME
    tmp = path.with_name(f".{SUMMARY_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary(results, out_dir), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path



def raise_if_any_failed(results: list[StudyResult]) -> None:
    """One line naming the failed studies' folders and first error, for the CLI/app to print (exit code 2)."""
    failed = [r for r in results if r.status != "succeeded"]
    if failed:
        first = failed[0]
        raise StudiesFailed(f"{len(failed)} of {len(results)} studies failed ({', '.join(r.folder for r in failed)}; "
                            f"see {SUMMARY_NAME}); first: {first.folder}: {first.error}")


# ---- helpers


def _close_study_folder(folder: Path) -> None:
    """Release a study folder's lock (the output folder's own lock guards the run) and remove it when the study
    left nothing in it (it failed before writing)."""
    from ..outputs.atomic import release_output_folder

    release_output_folder(folder)
    try:
        folder.rmdir()  # only succeeds when empty
    except OSError:
        pass


def _first_text(series: DicomSeries, keyword: str) -> str:
    for inst in series.instances:
        value = inst.dataset.get(keyword)
        if value not in (None, ""):
            return str(value).strip()
    return ""


def _why_not(series: DicomSeries, sel: Any) -> str:
    if not series.is_image:
        return "not an image series"
    if any(a is series for a in sel.alternatives):
        return f"matched '{sel.selection_name}' too, but {_preferred(sel.series, series)}"
    failing = _failing_condition(series, sel.conditions)
    return failing or f"matches only a selection tried after '{sel.selection_name}'"


def _preferred(chosen: DicomSeries, other: DicomSeries) -> str:
    a = sum(i.number_of_frames for i in chosen.instances)
    b = sum(i.number_of_frames for i in other.instances)
    if a != b:
        return f"the chosen series has more images ({a} > {b})"
    if chosen.series_number != other.series_number:
        return f"the chosen series has the lower Series Number ({chosen.series_number} < {other.series_number})"
    return "the chosen series has the smaller Series Instance UID"


def _failing_condition(series: DicomSeries, conditions: Mapping[str, Any]) -> str | None:
    from .selection import _compile_condition

    for keyword, rule in conditions.items():
        try:
            if not _compile_condition(str(keyword), rule).matches(series):
                return f"does not match {keyword}={rule!r}"
        except ValueError:
            return None
    return None
