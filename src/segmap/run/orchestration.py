"""One run of one input, shared by ``segmap run`` and the MONAI Deploy application.

:func:`start` prepares what every image of the input shares (the task and the model, checked against each other;
the claimed output folder with its :class:`~segmap.run.writer.ResultWriter`; one :class:`~segmap.run.inference.
Inference`, so the networks are loaded once per input however many studies it holds). :func:`run_input` then
takes a NIfTI input, or a DICOM input study by study (:mod:`segmap.run.studies`), through an
:data:`ImageRunner`: the plain steps in sequence (:func:`run_steps`, ``segmap run``) or the application's graph
(``app/app.py``), which calls the same steps from its operators.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..model import MonetModel
from ..settings import Settings
from ..tasks import SegmentationTask
from .inference import Inference
from .prepare import prepare
from .steps import choose_series, input_kind, load_nifti, load_series, scan_study
from .studies import process_studies, raise_if_any_failed, write_summary
from .values import Study
from .writer import ResultWriter


@dataclass
class RunContext:
    """What every image of one input shares."""

    settings: Settings
    #: ``"dicom"`` or ``"nifti"``.
    kind: str
    model: MonetModel
    task: SegmentationTask
    #: The networks, loaded at the first image and kept for the others.
    inference: Inference
    #: The writer into the output folder itself (the input's only study, or a NIfTI input).
    writer: ResultWriter

    def writer_for(self, folder: Path) -> ResultWriter:
        """The writer of one study's output folder (:func:`study_settings`)."""
        if Path(folder) == self.writer.out_dir:
            return self.writer
        return ResultWriter(study_settings(self.settings, folder), self.model, self.task, self.kind)


#: Takes one image of the input (a DICOM study, or None for the NIfTI input) through loading, inference and
#: writing with the given writer; returns the run report's path.
ImageRunner = Callable[[RunContext, "Study | None", ResultWriter], Path]


def start(settings: Settings) -> RunContext:
    """Check the settings, load the task and the model, claim the output folder (fails before any input is read)."""
    kind = input_kind(settings)
    model, task = prepare(settings)
    writer = ResultWriter(settings, model, task, kind)
    return RunContext(settings, kind, model, task, Inference(model, settings), writer)


def run_steps(context: RunContext, study: Study | None, writer: ResultWriter) -> Path:
    """The plain steps of one image in sequence (what the application's graph does with operators)."""
    task = context.task
    if study is None:
        image = load_nifti(context.settings.input, task)
    else:
        image = load_series(choose_series(study, task), task)
    return writer.write(context.inference.segment(image), image)


def run_input(context: RunContext, run_image: ImageRunner = run_steps) -> Path:
    """The whole input through ``run_image``; returns the path of the run report (of ``run_summary.json`` for a
    DICOM input of several studies). Nothing is written for a study unless it succeeds.

    A DICOM input runs study by study: one study is written at the top of the output folder as always; several go
    into ``study-<hash>/`` subfolders, each with its own report, then ``run_summary.json``; any failed study ends the
    run with one line (exit code 2) after the others are done.
    """
    if context.kind == "nifti":
        return run_image(context, None, context.writer)
    scanned = scan_study(context.settings.input)

    def one(scan, folder: Path) -> Path:
        return run_image(context, Study(scan, dict(scanned.timings_s)), context.writer_for(folder))

    results = process_studies(scanned.scan, context.writer.out_dir, one)
    if len(results) == 1:
        return results[0].report
    summary = write_summary(results, context.writer.out_dir)
    raise_if_any_failed(results)
    return summary


def run(settings: Settings) -> Path:
    """One complete run with the plain steps (``segmap run``); see :func:`run_input`."""
    return run_input(start(settings))


def study_settings(settings: Settings, folder: Path) -> Settings:
    """The settings of one study of a multi-study input, written into ``folder`` (``study-<hash>``): a ``uid_seed``
    is made per study, or every study's SEG would carry the same UIDs and a receiver would keep only one."""
    seed = f"{settings.uid_seed}/{Path(folder).name}" if settings.uid_seed else None
    return settings.with_values(output=folder, uid_seed=seed)
