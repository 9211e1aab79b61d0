"""``segmap demo``: a fresh phantom study through both variants with the bundled demo model.

Runs the same pipeline steps as the application's operators (DICOM: scan -> select -> volume -> inference ->
DICOM SEG; NIfTI: load -> inference -> NIfTI), then says where the outputs are and what they contain.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..errors import SegmapError

REPO = Path(__file__).resolve().parents[3]
DEMO_MODEL = REPO / "models" / "demo-spleen" / "model.ts"
DEMO_TASK = REPO / "tasks" / "spleen.yaml"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def run_demo(out: Path, *, device: str = "auto", model: Path = DEMO_MODEL, task: Path = DEMO_TASK,
             seed: int = 2024) -> dict:
    from ..outputs.nifti import read_label_nifti
    from ..outputs.seg import read_seg_labels
    from ..pipeline import RunOptions, run
    from .phantom import write_phantom_study

    for path, what in ((model, "demo model"), (task, "demo task file")):
        if not Path(path).exists():
            raise SegmapError(f"{what} not found at {path} (run from a segmap checkout, or pass --model/--task)")
    out = Path(out).absolute()
    t0 = time.perf_counter()
    study = write_phantom_study(out / "study", seed=seed, patient_name="DEMO^PHANTOM", patient_id="DEMO-0001")
    truth = study["phantom"].labels == 1
    print(f"phantom study (seed {seed}): {len(study['dicom_files'])} CT slices in {study['dicom_dir']}, "
          f"same volume as NIfTI {study['nifti']}")

    results = {}
    for variant, source in (("dicom", study["dicom_dir"]), ("nifti", study["nifti"])):
        report_path = run(RunOptions(model=Path(model), task=Path(task), input=Path(source),
                                     output=out / f"{variant}-output", variant=variant, device=device))
        report = json.loads(report_path.read_text())
        results[variant] = report
    seg_path = out / "dicom-output" / "segmentation.dcm"
    uids = [ds.SOPInstanceUID for ds in _sorted_slices(study["dicom_files"])]
    dicom_labels = read_seg_labels(seg_path, uids)
    nifti_labels, _ = read_label_nifti(out / "nifti-output" / "segmentation.nii.gz")

    print()
    print("segmap demo (synthetic phantom, demo model: not for clinical use)")
    for variant, report in results.items():
        seg = report["segments"][0]
        files = ", ".join(str(out / f"{variant}-output" / Path(o["path"]).name) for o in report["outputs"])
        print(f"  {variant:5s} variant: {files}")
        print(f"         segment '{seg['name']}': {seg['voxels']} voxels, {seg['volume_ml']:.1f} mL; "
              f"device {report['device']}; inference {report['timings_s'].get('inference', 0):.1f} s; "
              f"report {out / f'{variant}-output' / 'run_report.json'}")
    agree = bool(np.array_equal(dicom_labels, nifti_labels))
    dice = _dice(dicom_labels == 1, truth)
    print(f"  DICOM SEG and NIfTI label map identical: {'yes' if agree else 'NO'}; "
          f"Dice against the phantom's true spleen: {dice:.3f}; total {time.perf_counter() - t0:.1f} s")
    return {"identical": agree, "dice": dice, "reports": results}


def _sorted_slices(files):
    import pydicom

    datasets = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    return sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
