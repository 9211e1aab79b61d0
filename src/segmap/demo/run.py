"""``segmap demo``: a fresh phantom study through both variants with the bundled demo model.

Runs the same steps as the application's operators (:mod:`segmap.run`) (DICOM: scan -> select -> volume -> inference ->
DICOM SEG; NIfTI: load -> inference -> NIfTI), then says where the outputs are and what they contain.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pydicom

from ..errors import SegmapError
from ..outputs.nifti import read_label_nifti
from ..outputs.seg import read_seg_labels
from ..run import run
from ..settings import Settings
from .phantom import write_phantom_study

#: The bundled demo model and its task file, shipped inside the package (the repository's models/demo-spleen and
#: tasks/spleen.yaml point here), so `segmap demo` works from an installed wheel.
DEMO_MODEL = Path(__file__).resolve().parent / "model" / "model.ts"
DEMO_TASK = Path(__file__).resolve().parent / "model" / "spleen.yaml"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def run_demo(out: Path, *, device: str | None = None, model: Path = DEMO_MODEL, task: Path = DEMO_TASK,
             seed: int = 2024) -> dict:
    for path, what in ((model, "demo model"), (task, "demo task file")):
        if not Path(path).exists():
            raise SegmapError(f"{what} not found at {path} (a segmap installation without its demo; pass --model/--task)")
    out = Path(out).absolute()
    t0 = time.perf_counter()
    study = write_phantom_study(out / "study", seed=seed, patient_name="DEMO^PHANTOM", patient_id="DEMO-0001")
    truth = study["phantom"].labels == 1
    print(f"phantom study (seed {seed}): {len(study['dicom_files'])} CT slices in {study['dicom_dir']}, "
          f"same volume as NIfTI {study['nifti']}")

    results, reports = {}, {}
    for variant, source in (("dicom", study["dicom_dir"]), ("nifti", study["nifti"])):
        reports[variant] = run(Settings(models=Path(model), task_file=Path(task), input=Path(source),
                                        output=out / f"{variant}-output", input_kind=variant,
                                        **({"device": device} if device else {})))
        results[variant] = json.loads(reports[variant].read_text())
    outputs = {v: reports[v].parent / report["outputs"][0]["path"] for v, report in results.items()}
    uids = [ds.SOPInstanceUID for ds in _sorted_slices(study["dicom_files"])]
    dicom_labels = read_seg_labels(outputs["dicom"], uids)
    nifti_labels, _ = read_label_nifti(outputs["nifti"])

    print()
    print("segmap demo (synthetic phantom, demo model: not for clinical use)")
    for variant, report in results.items():
        seg = report["segments"][0]
        print(f"  {variant:5s} input: {outputs[variant]}")
        print(f"         segment '{seg['name']}': {seg['voxels']} voxels, {seg['volume_ml']:.1f} mL; "
              f"device {report['device']}; inference {report['timings_s'].get('inference', 0):.1f} s; "
              f"report {reports[variant]}")
        for o in report["outputs"][1:]:
            print(f"         {o['kind']}: {reports[variant].parent / o['path']}")
    agree = bool(np.array_equal(dicom_labels, nifti_labels))
    dice = _dice(dicom_labels == 1, truth)
    print(f"  DICOM SEG and NIfTI label map identical: {'yes' if agree else 'NO'}; "
          f"Dice against the phantom's true spleen: {dice:.3f}; total {time.perf_counter() - t0:.1f} s")
    return {"identical": agree, "dice": dice, "reports": results}


def _sorted_slices(files):
    datasets = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    return sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
