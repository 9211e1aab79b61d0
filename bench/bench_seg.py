"""Where the time goes when segmap writes a DICOM SEG, BINARY (default) against LABELMAP, and how big each file is.

Cases (512x512 slices, source headers without pixel data, as the pipeline passes them):

- ``two``: 300 slices, 2 segments (a spleen/liver-like pair of blobs over most slices);
- ``many``: 100 segments (TotalSegmentator-like), each a blob over a band of slices; ``--many-slices`` sets the
  slice count (default 300; a BINARY SEG keeps one frame per segment per slice, so that is 30 000 frames).

For each case and type it prints the wall time, then a profiled run's time split into segmap's checks,
highdicom's ``Segmentation`` construction (and inside it: frame encoding, per-frame functional groups) and
pydicom's ``save_as``, the file size and the number of frames, then reads the file back and checks it voxel for
voxel. Run ``.venv/bin/python bench/bench_seg.py --help``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from segmap.outputs.seg import read_seg_labels, write_seg
from segmap.tasks import Code, Segment

ORGAN = Code("91772007", "SCT", "Organ")


def source_headers(nz: int, ny: int = 512, nx: int = 512) -> list[Dataset]:
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(nz):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "", "", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", "", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.ImagePositionPatient = [-200.0, -200.0, 1.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 1.5
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        out.append(ds)
    return out


def blob_labels(nz: int, n_segments: int, ny: int = 512, nx: int = 512, seed: int = 0) -> np.ndarray:
    """Ellipsoid-ish blobs, one per segment, each over a band of slices (later segments overwrite earlier)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((nz, ny, nx), np.uint8 if n_segments < 256 else np.uint16)
    yy, xx = np.mgrid[:ny, :nx]
    for s in range(1, n_segments + 1):
        z0 = int(rng.integers(0, max(nz - nz // 3, 1)))
        z1 = min(nz, z0 + max(nz // 3, 2))
        cy, cx = rng.integers(100, ny - 100), rng.integers(100, nx - 100)
        ry, rx = rng.integers(10, 60), rng.integers(10, 60)
        disc = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        labels[z0:z1][:, disc] = s
    return labels


def segments(n: int) -> list[Segment]:
    return [Segment(f"Structure {k}", ORGAN, Code("91772007", "SCT", "Organ"), "bench-algorithm")
            for k in range(1, n + 1)]


def profiled_write(labels, headers, segs, path, seg_type):
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    write_seg(labels, headers, segs, path, segmentation_type=seg_type)
    prof.disable()
    total = time.perf_counter() - t
    stats = pstats.Stats(prof)

    def cumulative(name_part: str, file_part: str = "") -> float:
        return max((v[3] for k, v in stats.stats.items() if name_part == k[2] and file_part in k[0]), default=0.0)

    parts = {
        "highdicom Segmentation()": cumulative("__init__", "highdicom/seg/sop.py"),
        "  frame encoding": cumulative("_encode_pixels_native", "highdicom") + cumulative("encode_frame", "highdicom"),
        "  per-frame groups": cumulative("_get_pffg_item", "highdicom"),
        "pydicom save_as": cumulative("save_as", "pydicom/dataset.py"),
        "segmap checks": cumulative("_checked_labels", "segmap") + cumulative("_check_source", "segmap"),
    }
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:6]
    return total, parts, [(f"{Path(k[0]).name}:{k[2]}", v[2]) for k, v in top]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="two,many")
    ap.add_argument("--slices", type=int, default=300, help="slices of the two-segment case")
    ap.add_argument("--many-slices", type=int, default=300, help="slices of the 100-segment case")
    ap.add_argument("--types", default="BINARY,LABELMAP")
    args = ap.parse_args(argv)
    cases = {"two": (args.slices, 2), "many": (args.many_slices, 100)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            nz, n_seg = cases[name]
            headers, labels, segs = source_headers(nz), blob_labels(nz, n_seg), segments(n_seg)
            print(f"case {name}: {nz} slices 512x512, {n_seg} segments")
            for seg_type in args.types.split(","):
                path = Path(tmp) / f"{name}-{seg_type}.dcm"
                t = time.perf_counter()
                write_seg(labels, headers, segs, path, segmentation_type=seg_type)
                wall = time.perf_counter() - t
                total, parts, top = profiled_write(labels, headers, segs, path, seg_type)
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                print(f"  {seg_type:<8} {wall:7.2f} s ({total:.2f} s profiled)  {path.stat().st_size / 2**20:8.1f} MiB"
                      f"  {int(ds.NumberOfFrames)} frames")
                for k, v in parts.items():
                    print(f"      {k:<26} {v:7.2f} s")
                print("      most own time: " + ", ".join(f"{n} {s:.2f} s" for n, s in top[:4]))
                t = time.perf_counter()
                back = read_seg_labels(path, [h.SOPInstanceUID for h in headers])
                ok = np.array_equal(back, labels)
                verdict = "equal" if ok else "DIFFERENT"
                print(f"      read back {time.perf_counter() - t:.2f} s, voxel for voxel {verdict}")
                if not ok:
                    return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
