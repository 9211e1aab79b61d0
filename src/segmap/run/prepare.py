"""Before any input is read: the settings checked, the task and the model loaded and cross-checked."""

from __future__ import annotations

from pathlib import Path

from ..model import MonetModel, is_results_folder, load_model, parse_folds
from ..settings import Settings, validate_settings
from ..tasks import SegmentationTask, load_task
from ..validate import check_agreement


def resolve_model_path(path: Path) -> Path:
    """A model file, fold folder or results folder; a folder holding exactly one of those (a MAP's models/<name>/)
    is entered."""
    def is_model(d: Path) -> bool:
        return (d / "model.ts").exists() or any(d.glob("fold_*/model.ts")) or is_results_folder(d)

    path = Path(path)
    if path.is_dir() and not is_model(path):
        subdirs = [d for d in path.iterdir() if d.is_dir() and is_model(d)]
        if len(subdirs) == 1:
            return subdirs[0]
    return path


def prepare(settings: Settings) -> tuple[MonetModel, SegmentationTask]:
    """Load and cross-check the model and the task (fails before any input is read)."""
    validate_settings(settings)
    task = load_task(settings.task_file, settings.task_name)
    model_path = resolve_model_path(settings.model_path)
    model = load_model(model_path, folds=parse_folds(settings.folds), checkpoint=settings.checkpoint)
    check_agreement(task, model.spec, task_source=settings.task_file, model_source=model_path)
    return model, task
