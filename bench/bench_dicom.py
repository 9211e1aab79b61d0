"""segmap's DICOM path against MONAI Deploy's DICOM operators: same CT series, same label map, one process.

Stages, each timed for both sides, alternating (ours, SDK, ours, SDK, ...) after one untimed run of each, and
reported as medians:

1. load + volume: ``scan_dicom_folder`` -> ``select_dicom_series`` -> ``dicom_inputs`` against
   ``DICOMDataLoaderOperator.load_data_to_studies`` -> ``DICOMSeriesSelectorOperator.filter`` (the task's own
   Rules_Text) -> ``DICOMSeriesToVolumeOperator.convert_to_image``; the two volumes are checked voxel for voxel.
2. inference (only with ``--with-inference``): segmap's ``Segmenter`` with the bundled demo model; the SDK has no
   nnU-Net counterpart here, so no ratio.
3. DICOM SEG write, two segments (the phantom's spleen and liver): ``segmap.outputs.seg.write_seg`` against
   ``DICOMSegmentationWriterOperator.process_images``, both keeping empty frames, both omitting them, and each at its
   own default (segmap keeps them, the SDK omits them). highdicom's ``Segmentation`` + ``save_as`` alone on the same
   input is timed too, as the floor both writers stand on.

The SDK operators are created on an ``Application`` (their fragment) and their methods are called directly; no
graph is run. The series is a phantom CT written uncompressed, one file per slice (generated once per run; keep it
with ``--workdir`` to skip the generation next time). Run ``.venv/bin/python bench/bench_dicom.py --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TASK_FILE = ROOT / "tasks" / "spleen.yaml"
DEMO_MODEL = ROOT / "models" / "demo-spleen"
SPACING_ZYX = (1.0, 0.78, 0.78)
#: Phantom labels kept as the two segments (1 spleen, 2 liver); 3 (bone) becomes background.
N_SEGMENTS = 2


# ---------------------------------------------------------------------------------------------------------- data


def prepare_series(workdir: Path, n_slices: int) -> tuple[Path, np.ndarray]:
    """``workdir/series`` (one uncompressed file per slice, ``slice_0001.dcm`` first) and its label map (file order).

    Reused when ``workdir`` already holds them for ``n_slices``.
    """
    from segmap.demo.phantom import make_phantom, write_dicom_series

    series_dir, labels_path = workdir / "series", workdir / "labels.npy"
    if labels_path.exists() and series_dir.is_dir() and len(list(series_dir.glob("*.dcm"))) == n_slices:
        labels = np.load(labels_path)
        if labels.shape == (n_slices, 512, 512):
            print(f"reusing the series in {series_dir}")
            return series_dir, labels
    shutil.rmtree(series_dir, ignore_errors=True)
    t = time.perf_counter()
    phantom = make_phantom((n_slices, 512, 512), SPACING_ZYX, seed=0, extra_labels=True)
    write_dicom_series(phantom, series_dir)
    labels = np.where(phantom.labels <= N_SEGMENTS, phantom.labels, 0).astype(np.uint8)
    np.save(labels_path, labels)
    print(f"generated a {n_slices} x 512 x 512 phantom CT series in {time.perf_counter() - t:.0f} s: {series_dir}")
    return series_dir, labels


def two_segment_task():
    """The demo spleen task with a second segment (liver), so the SEG has two segments."""
    from segmap.tasks import Code, Segment, load_task

    task = load_task(TASK_FILE)
    spleen = task.segments[0]
    liver = Segment(label="Liver", category=spleen.category, type=Code("10200004", "SCT", "Liver"),
                    algorithm_name=spleen.algorithm_name, algorithm_version=spleen.algorithm_version,
                    color_rgb=(221, 130, 101))
    return dataclasses.replace(task, segments=(spleen, liver))


def sdk_segment_descriptions(segments):
    from monai.deploy.operators.dicom_seg_writer_operator import SegmentDescription
    from pydicom.sr.coding import Code

    def code(c):
        return Code(c.value, c.scheme, c.meaning)

    return [SegmentDescription(segment_label=s.label, segmented_property_category=code(s.category),
                               segmented_property_type=code(s.type), algorithm_name=s.algorithm_name,
                               algorithm_version=s.algorithm_version) for s in segments]


# ------------------------------------------------------------------------------------------------------ timing


def timed(fn):
    gc.collect()
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def alternate(repeat: int, ours, sdk) -> tuple[list[float], list[float], object, object]:
    """Run ``ours`` and ``sdk`` alternately ``repeat`` times each, after one untimed run of each (first calls load
    lookup tables, e.g. highdicom's IOD tables); returns both timings and the last results."""
    ours(), sdk()
    t_ours, t_sdk = [], []
    r_ours = r_sdk = None
    for _ in range(repeat):
        r_ours = None  # let the previous result go before the next run
        t, r_ours = timed(ours)
        t_ours.append(t)
        r_sdk = None
        t, r_sdk = timed(sdk)
        t_sdk.append(t)
    return t_ours, t_sdk, r_ours, r_sdk


def fmt(times: list[float]) -> str:
    return f"{statistics.median(times):7.3f} s  (min {min(times):.3f}, max {max(times):.3f})"


class Report:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def stage(self, name: str, ours: list[float], sdk: list[float] | None, goal: float | None = None) -> None:
        row = {"stage": name, "ours_s": statistics.median(ours), "ours_all_s": ours}
        print(f"\n{name}")
        print(f"  segmap : {fmt(ours)}")
        if sdk is not None:
            ratio = statistics.median(ours) / statistics.median(sdk)
            row.update(sdk_s=statistics.median(sdk), sdk_all_s=sdk, ratio=ratio)
            print(f"  SDK    : {fmt(sdk)}")
            verdict = "" if goal is None else ("  (goal <= %.2f: %s)" % (goal, "met" if ratio <= goal else "NOT met"))
            print(f"  ratio segmap/SDK: {ratio:.2f}{verdict}")
            row["goal"] = goal
        self.rows.append(row)

    def line(self, text: str) -> None:
        print(f"  {text}")


# ------------------------------------------------------------------------------------------------------ stages


def dciodvfy_errors(path: Path) -> str:
    if not shutil.which("dciodvfy"):
        return "dciodvfy not installed"
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    return f"{len(errors)} error line(s)" + (f", first: {errors[0]}" if errors else "")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Ratios are segmap's median time over the SDK's (below 1: segmap is "
                                            "faster). Goals from the issue: load+volume and SEG write at most 0.5.")
    parser.add_argument("--slices", type=int, default=300, help="slices of the 512 x 512 series (default 300)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each side per stage (default 3)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the generated series here and reuse it on the next run (default: a temp dir)")
    parser.add_argument("--stages", default="load,seg",
                        help="comma-separated stages to time: load, seg (default both); a stage not timed still runs "
                             "once when a later one needs its result")
    parser.add_argument("--with-inference", action="store_true",
                        help="also time segmap's inference with the demo model on the loaded volume (slow on CPU)")
    parser.add_argument("--inference-repeat", type=int, default=1, help="timed inference runs (default 1)")
    parser.add_argument("--no-validate", action="store_true", help="skip dciodvfy and the read-back check of the SEGs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.slices < 2 or args.repeat < 1:
        parser.error("--slices must be at least 2 and --repeat at least 1")
    args.stages = {x.strip() for x in args.stages.split(",") if x.strip()}
    if not args.stages or args.stages - {"load", "seg"}:
        parser.error("--stages takes load and/or seg")
    return args


@dataclasses.dataclass
class Loaded:
    """What stage 1 left for the later stages, for each side."""

    inputs: object  # segmap.run.values.InputImage
    sdk_selected: list  # the SDK's StudySelectedSeries list (slices sorted by convert_to_image)
    labels_ours: np.ndarray  # [z, y, x] in segmap's slice order
    labels_sdk: np.ndarray  # the same in the SDK's slice order


def stage_load(args, report: Report, series_dir: Path, labels_by_file: np.ndarray, task, app) -> Loaded:
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
    from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator

    from segmap.run.steps import choose_series, load_series, scan_study

    loader = DICOMDataLoaderOperator(app, name="loader", input_folder=series_dir)
    selector = DICOMSeriesSelectorOperator(app, name="selector")
    to_volume = DICOMSeriesToVolumeOperator(app, name="to_volume")
    rules = task.modalities[0].rules  # the same selection rules for both sides

    def ours():
        return load_series(choose_series(scan_study(series_dir), task), task)

    def sdk():
        selected = selector.filter(rules, loader.load_data_to_studies(series_dir))
        return to_volume.convert_to_image(selected), selected

    if "load" in args.stages:
        t_ours, t_sdk, inputs, (image, sdk_selected) = alternate(args.repeat, ours, sdk)
        report.stage("1. load + volume (scan, select, decode)", t_ours, t_sdk, goal=0.5)
    else:
        print("\n1. load + volume: not timed (--stages)")
        inputs, (image, sdk_selected) = ours(), sdk()

    ours_zyx, sdk_zyx = inputs.volume.array[0], image.asnumpy()
    if sdk_zyx.shape != ours_zyx.shape and sdk_zyx.shape[::-1] == ours_zyx.shape:
        sdk_zyx = sdk_zyx.transpose(2, 1, 0)  # an SDK that returns [x, y, z]
    same = sdk_zyx.shape == ours_zyx.shape and np.array_equal(sdk_zyx, ours_zyx)
    report.line(f"same voxels: {'yes' if same else 'NO'} (segmap {ours_zyx.dtype} {ours_zyx.shape} [z, y, x], "
                f"SDK {image.asnumpy().dtype} {image.asnumpy().shape})")

    # The label map in each side's slice order (file slice_000k.dcm is phantom slice k - 1).
    ours_order = [int(Path(p).stem.split("_")[-1]) - 1 for p in inputs.volume.meta["source_paths"]]
    by_uid = dict(zip(inputs.volume.meta["sop_instance_uids"], ours_order))
    sdk_series = sdk_selected[0].selected_series[0].series
    sdk_order = [by_uid[str(s.get_native_sop_instance().SOPInstanceUID)] for s in sdk_series.get_sop_instances()]
    loaded = Loaded(inputs, sdk_selected, np.ascontiguousarray(labels_by_file[ours_order]),
                    np.ascontiguousarray(labels_by_file[sdk_order]))
    report.line(f"slice order: {'the same' if ours_order == sdk_order else 'different'}; label map "
                f"{loaded.labels_ours.dtype}, voxels per label "
                f"{np.bincount(loaded.labels_ours.ravel(), minlength=N_SEGMENTS + 1).tolist()}")
    return loaded


def stage_inference(args, report: Report, loaded: Loaded) -> None:
    from segmap.engine import EngineOptions, Segmenter
    from segmap.model import load_model

    segmenter = Segmenter(load_model(DEMO_MODEL), EngineOptions(device="cpu"))
    volume = loaded.inputs.volume
    times = []
    for _ in range(max(1, args.inference_repeat)):
        t, predicted = timed(lambda: segmenter.predict(volume.array, volume.spacing_zyx))
        times.append(t)
    report.stage("2. inference (segmap engine, demo model, CPU; no SDK counterpart)", times, None)
    report.line(f"predicted voxels per label: {np.bincount(predicted.ravel()).tolist()}")


def stage_seg(args, report: Report, loaded: Loaded, task, app, out_dir: Path) -> None:
    import highdicom as hd
    from monai.deploy.core import Image
    from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator

    from segmap.outputs.seg import read_seg_labels, segment_description, write_seg

    out_dir.mkdir(parents=True, exist_ok=True)
    sdk_descriptions = sdk_segment_descriptions(task.segments)
    writers = {omit: DICOMSegmentationWriterOperator(app, name=f"seg_writer_{omit}", output_folder=out_dir,
                                                     segment_descriptions=sdk_descriptions, omit_empty_frames=omit)
               for omit in (False, True)}
    sources = loaded.inputs.reference_datasets

    def ours(omit: bool):
        path = out_dir / f"segmap_{'omit' if omit else 'keep'}.dcm"
        return lambda: write_seg(loaded.labels_ours, sources, task.segments, path, omit_empty_frames=omit)

    def sdk(omit: bool):
        folder = out_dir / f"sdk_{'omit' if omit else 'keep'}"

        def run():
            shutil.rmtree(folder, ignore_errors=True)
            writers[omit].process_images(Image(loaded.labels_sdk), loaded.sdk_selected, folder)
            return next(folder.glob("*.dcm"))
        return run

    def highdicom_alone(omit: bool):
        descriptions = [segment_description(i, s) for i, s in enumerate(task.segments, start=1)]

        def run():
            seg = hd.seg.Segmentation(
                source_images=sources, pixel_array=loaded.labels_ours, segmentation_type="BINARY",
                segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
                sop_instance_uid=hd.UID(), instance_number=1, manufacturer="segmap",
                manufacturer_model_name="segmap", software_versions="0", device_serial_number="0",
                omit_empty_frames=omit)
            seg.save_as(out_dir / "highdicom_alone.dcm")
        return run

    written = {}
    for label, omit_ours, omit_sdk in (("both keep empty frames", False, False),
                                       ("both omit empty frames", True, True),
                                       ("each at its default (segmap keeps, SDK omits)", False, True)):
        t_ours, t_sdk, p_ours, p_sdk = alternate(args.repeat, ours(omit_ours), sdk(omit_sdk))
        report.stage(f"3. SEG write, 2 segments, {label}", t_ours, t_sdk, goal=0.5)
        written[(omit_ours, omit_sdk)] = (p_ours, p_sdk)
        report.line(f"files: segmap {p_ours.stat().st_size / 1e6:.1f} MB, SDK {p_sdk.stat().st_size / 1e6:.1f} MB")
    for omit in (False, True):
        highdicom_alone(omit)()
        times = [timed(highdicom_alone(omit))[0] for _ in range(args.repeat)]
        report.stage(f"   highdicom Segmentation + save_as alone, {'omitting' if omit else 'keeping'} empty frames",
                     times, None)

    if args.no_validate:
        return
    print("\nchecks")
    for (omit_ours, omit_sdk), (p_ours, p_sdk) in written.items():
        if omit_ours != omit_sdk:
            continue
        mode = "omit" if omit_ours else "keep"
        back = read_seg_labels(p_ours, loaded.inputs.volume.meta["sop_instance_uids"])
        report.line(f"segmap SEG ({mode}): reads back to the same label map: "
                    f"{'yes' if np.array_equal(back, loaded.labels_ours) else 'NO'}; dciodvfy: {dciodvfy_errors(p_ours)}")
        report.line(f"SDK SEG    ({mode}): dciodvfy: {dciodvfy_errors(p_sdk)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # per-call log lines of both sides would be part of the timings otherwise
    from monai.deploy.core import Application

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="segmap-bench-dicom-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        series_dir, labels_by_file = prepare_series(workdir, args.slices)
        task = two_segment_task()
        report = Report()
        print(f"\nseries: {args.slices} x 512 x 512 CT, uncompressed, one file per slice; {args.repeat} run(s) per "
              f"side and stage, alternating; {os.cpu_count()} CPU(s)")
        app = Application()  # the fragment the SDK operators belong to; no graph is run

        loaded = stage_load(args, report, series_dir, labels_by_file, task, app)
        if args.with_inference:
            stage_inference(args, report, loaded)
        else:
            print("\n2. inference: not timed (--with-inference); the SEG stage uses the phantom's own labels")
        if "seg" in args.stages:
            stage_seg(args, report, loaded, task, app, workdir / "out")
        else:
            print("\n3. SEG write: not timed (--stages)")

        print("\nsummary (median seconds; ratio = segmap / SDK)")
        for row in report.rows:
            sdk = f" vs {row['sdk_s']:6.3f}  ratio {row['ratio']:.2f}" if "ratio" in row else ""
            print(f"  {row['stage'].strip():<70} {row['ours_s']:6.3f}{sdk}")
        if args.json:
            args.json.write_text(json.dumps({"slices": args.slices, "repeat": args.repeat, "stages": report.rows},
                                            indent=2))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
