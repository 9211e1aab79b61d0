"""A segmap run: the layer that ``segmap run`` and the MONAI Deploy application (``app/``) both call.

- :mod:`~segmap.run.values`: what flows between the steps (``Study``, ``SeriesChoice``, ``InputImage``);
- :mod:`~segmap.run.steps`: the loading steps as plain functions (scan, choose series, load; or load NIfTI);
- :mod:`~segmap.run.prepare`: the settings checked, the task and the model loaded and cross-checked;
- :mod:`~segmap.run.inference`: ``Inference``, the networks loaded once per input;
- :mod:`~segmap.run.host`: threads, memory and the output mask of the machine the run is on;
- :mod:`~segmap.run.writer`: ``ResultWriter``, the output format, overlay and run report, all or nothing;
- :mod:`~segmap.run.studies`: an input of several studies, each into its own folder, then ``run_summary.json``;
- :mod:`~segmap.run.orchestration`: one input from start to end (:func:`run`), with the plain steps or a graph.
"""

from .inference import Inference
from .orchestration import RunContext, run, run_input, run_steps, start, study_settings
from .prepare import prepare, resolve_model_path
from .steps import choose_series, detect_input_kind, input_kind, load_nifti, load_series, scan_study
from .values import InputImage, SeriesChoice, Study
from .writer import ResultWriter

__all__ = [
    "Inference",
    "InputImage",
    "ResultWriter",
    "RunContext",
    "SeriesChoice",
    "Study",
    "choose_series",
    "detect_input_kind",
    "input_kind",
    "load_nifti",
    "load_series",
    "prepare",
    "resolve_model_path",
    "run",
    "run_input",
    "run_steps",
    "scan_study",
    "start",
    "study_settings",
]
