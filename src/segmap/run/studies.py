"""An input of several studies, run study by study: each into its own output folder, then ``run_summary.json``.

A hospital export folder often holds more than one study (two patients, or today's study and a prior);
:func:`segmap.dicom.studies.split_by_study` divides it, and this module runs the studies:

- :func:`process_studies` runs a callback per study into its own output subfolder named by
  :func:`study_folder_name` (a hash of the StudyInstanceUID, never patient data); a study that fails is recorded
  and the others still run. A single study keeps the plain layout (outputs at the top of the output folder, no
  summary);
- :func:`write_summary` writes ``run_summary.json`` at the top, and :func:`raise_if_any_failed` ends the run with
  one line and exit code 2 when any study failed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import __version__
from ..dicom.loading import DicomScan
from ..dicom.studies import split_by_study
from ..errors import SegmapError, StudiesFailed
from ..outputs.atomic import release_output_folder
from ..text import first_line

log = logging.getLogger(__name__)

SUMMARY_NAME = "run_summary.json"
STUDY_FOLDER_PREFIX = "study-"


def study_folder_name(study_instance_uid: str) -> str:
    """Output subfolder of one study: ``study-`` and 12 hex digits of the SHA-256 of its StudyInstanceUID (the same
    name on every run, different for different studies, and nothing about the patient in it)."""
    return STUDY_FOLDER_PREFIX + hashlib.sha256(study_instance_uid.encode()).hexdigest()[:12]


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
            result.error = first_line(e) if isinstance(e, SegmapError) else \
                f"internal error: {type(e).__name__}: {first_line(e)}"
            log.error("study %s (%s) failed: %s", uid, result.folder, result.error)
        finally:
            if not single:
                _close_study_folder(target)
        results.append(result)
    return results


def summary(results: list[StudyResult], out_dir: Path) -> dict:
    """The top-level ``run_summary.json`` document of a multi-study run."""
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


def _close_study_folder(folder: Path) -> None:
    """Release a study folder's lock (the output folder's own lock guards the run) and remove it when the study
    left nothing in it (it failed before writing)."""
    release_output_folder(folder)
    try:
        folder.rmdir()  # only succeeds when empty
    except OSError:
        pass
