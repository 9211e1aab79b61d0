"""Synthetic CT-like abdominal phantoms, written as NIfTI and as a DICOM CT series.

A phantom is an axial slab of a stylised upper abdomen in Hounsfield units: air outside an elliptical body,
a subcutaneous fat layer, soft tissue, a vertebra (cortical rim, cancellous body, posterior arch, discs between
vertebrae), posterior ribs, a large liver-like organ on the patient's right and a contrast-enhanced spleen-like
organ on the left, posterior. Shapes, sizes and positions are jittered by the seed; edges are slightly blurred
(partial volume) and Gaussian noise is added. Nothing here is for clinical use.

Geometry: the grid is axial in LPS (DICOM's patient coordinates): voxel index x runs to the patient's left (+L),
y to posterior (+P), z to superior (+S). Arrays are ``[z, y, x]``; the affine maps ``(x, y, z)`` to RAS+ mm, so
its first two columns are negative. Anatomy is laid out in millimetres around the centre of the field of view and
shrunk only when the field of view is smaller than the default (192 mm), so a phantom generated at another spacing
is the same "patient" sampled differently.

The air is -1000 HU, not 0: nnU-Net's crop to the nonzero bounding box therefore keeps the whole grid, as it does
for real CT.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.uid import UID, ExplicitVRLittleEndian

from ..volume import affine_from_dicom

#: The demo model's labels (dataset.json ``labels``).
LABELS = {"background": 0, "spleen": 1}
#: Labels of a phantom made with ``extra_labels=True``.
EXTRA_LABELS = {"background": 0, "spleen": 1, "liver": 2, "bone": 3}

#: Mean Hounsfield units of the tissues.
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "soft_tissue": 40.0,
    "csf": 15.0,
    "disc": 80.0,
    "liver": 60.0,
    "spleen": 120.0,
    "cancellous_bone": 700.0,
    "cortical_bone": 1200.0,
}
#: Noise SD for a 3 x 1.5 x 1.5 mm voxel; like a scanner's, it scales with 1 / sqrt(voxel volume).
NOISE_SD_HU = 10.0
_NOISE_REFERENCE_MM3 = 3.0 * 1.5 * 1.5
#: Scanner blur (Gaussian sigma, mm). Each voxel also averages over its own size, so that a phantom made
#: directly on a coarse grid resembles a fine one resampled to that grid.
PSF_SIGMA_MM = 0.8

#: Stored DICOM values are HU - RESCALE_INTERCEPT, unsigned 12 bit, as most scanners write them.
RESCALE_INTERCEPT = -1024
_HU_MIN, _HU_MAX = RESCALE_INTERCEPT, RESCALE_INTERCEPT + 4095

_DEFAULT_FOV_MM = 192.0
#: LPS position of the centre of the field of view (a typical table position).
_FOV_CENTRE_LPS = np.array([0.0, 0.0, -150.0])


@dataclass
class Phantom:
    """One phantom: HU image, label map and the grid they share."""

    #: ``[z, y, x]`` int16 Hounsfield units.
    hu: np.ndarray
    #: ``[z, y, x]`` uint8 labels (see :data:`LABELS`, or :data:`EXTRA_LABELS` for ``extra_labels=True``).
    labels: np.ndarray
    #: 4x4 matrix mapping voxel ``(x, y, z, 1)`` to RAS+ mm.
    affine: np.ndarray

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        x, y, z = (float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))
        return (z, y, x)


def _check_triplet(name: str, value: Sequence, kind: type) -> tuple:
    if len(value) != 3:
        raise ValueError(f"{name} must have 3 values (z, y, x), got {value!r}")
    out = tuple(kind(v) for v in value)
    if any(v <= 0 for v in out):
        raise ValueError(f"{name} values must be positive, got {value!r}")
    return out


def phantom_affine(shape_zyx: Sequence[int], spacing_zyx: Sequence[float]) -> np.ndarray:
    """RAS affine of the axial LPS grid used by :func:`make_phantom` (field of view centred on the table)."""
    nz, ny, nx = shape_zyx
    sz, sy, sx = spacing_zyx
    first_lps = _FOV_CENTRE_LPS - np.array([(nx - 1) * sx, (ny - 1) * sy, (nz - 1) * sz]) / 2.0
    return affine_from_dicom(first_lps, np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, sz]), (sy, sx))


def _rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])  # acts on (z, y, x) vectors


def _ellipsoid_radius(p: tuple[np.ndarray, ...], centre: Sequence[float], semi: Sequence[float],
                      angle: float = 0.0) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) of points ``p = (z, y, x)`` in mm; in-plane rotation."""
    rot = _rotation_z(angle)
    d = [p[i] - centre[i] for i in range(3)]
    q = [rot[i, 0] * d[0] + rot[i, 1] * d[1] + rot[i, 2] * d[2] for i in range(3)]
    return np.sqrt(sum((q[i] / semi[i]) ** 2 for i in range(3)))


def make_phantom(shape_zyx: Sequence[int] = (48, 128, 128), spacing_zyx: Sequence[float] = (3.0, 1.5, 1.5),
                 seed: int = 0, extra_labels: bool = False) -> Phantom:
    """A random abdominal CT phantom on an axial grid of ``shape_zyx`` voxels of ``spacing_zyx`` mm.

    The label map holds 1 for the spleen; with ``extra_labels`` also 2 for the liver and 3 for bone (vertebra and
    ribs, cortical and cancellous). The same arguments always give the same phantom.
    """
    from scipy import ndimage

    shape_zyx = _check_triplet("shape_zyx", shape_zyx, int)
    spacing_zyx = _check_triplet("spacing_zyx", spacing_zyx, float)
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape_zyx
    sz, sy, sx = spacing_zyx

    # Coordinates in mm relative to the FOV centre, LPS directions: +x left, +y posterior, +z superior.
    z = ((np.arange(nz) - (nz - 1) / 2.0) * sz)[:, None, None]
    y = ((np.arange(ny) - (ny - 1) / 2.0) * sy)[None, :, None]
    x = ((np.arange(nx) - (nx - 1) / 2.0) * sx)[None, None, :]
    fov = min(nx * sx, ny * sy)
    k = min(1.0, fov / _DEFAULT_FOV_MM)  # in-plane anatomy scale
    z, y, x = np.broadcast_arrays(z, y / k, x / k)  # anatomy below is laid out for the default FOV
    p = (z, y, x)

    def jit(scale: float) -> float:
        return float(rng.uniform(-scale, scale))

    # Body outline and fat layer.
    body_a, body_b = 85.0 * (1 + jit(0.04)), 70.0 * (1 + jit(0.04))  # semi-axes x (lateral), y (AP)
    body_r = np.sqrt((x / body_a) ** 2 + (y / body_b) ** 2)
    fat_mm = 10.0 + jit(3.0)
    inner_r = np.sqrt((x / (body_a - fat_mm)) ** 2 + (y / (body_b - fat_mm)) ** 2)
    body = body_r <= 1.0
    inner = inner_r <= 1.0
    visceral = inner_r <= 0.86  # inside the rib cage

    # Spine: vertebral body with cortical rim, discs every ~30 mm, posterior arch around the canal.
    spine_y = 30.0 + jit(2.0)
    vb_r = 14.0 + jit(1.5)
    vb_d = np.sqrt(x ** 2 + (y - spine_y) ** 2)
    disc_period, disc_phase = 30.0, rng.uniform(0, 30.0)
    disc = np.abs(((z - disc_phase) % disc_period) - disc_period / 2) > disc_period / 2 - 3.0
    vertebral_body = (vb_d <= vb_r) & ~disc
    canal_y = spine_y + vb_r + 7.0
    canal_d = np.sqrt(x ** 2 + (y - canal_y) ** 2)
    canal = canal_d <= 6.5
    arch = (canal_d > 6.5) & (canal_d <= 10.5) & (y > spine_y + vb_r - 2.0)
    spinous = (np.abs(x) <= 3.5) & (y > canal_y + 9.0) & (y <= canal_y + 20.0)
    cortical = ((vb_d > vb_r - 2.0) & vertebral_body) | arch | spinous

    # Posterior ribs: bands just inside the fat layer, posterolateral, in slabs in the upper half.
    ribs = np.zeros(shape_zyx, bool)
    angle = np.arctan2(np.abs(x), -y)  # 0 = anterior midline, pi = posterior midline
    rib_band = (inner_r > 0.88) & (inner_r <= 0.97) & (angle > np.deg2rad(95)) & (angle < np.deg2rad(160))
    rib_z = -30.0 + rng.uniform(0, 10.0)
    while rib_z < z.max() + 10.0:
        # Ribs descend as they run forward: the slab's z shifts with the angle.
        slab_centre = rib_z - 12.0 * (np.pi - angle)
        ribs |= rib_band & (np.abs(z - slab_centre) <= 4.0 + jit(0.8))
        rib_z += 22.0 + jit(2.0)
    rib_cortex = ribs & ~ndimage.binary_erosion(ribs, iterations=1)

    # Liver: a large right lobe (patient's right = -x) and a left lobe crossing the midline anteriorly.
    liver_r = _ellipsoid_radius(p, (25.0 + jit(8.0), -8.0 + jit(5.0), -32.0 + jit(5.0)),
                                (55.0 * (1 + jit(0.1)), 44.0 * (1 + jit(0.1)), 42.0 * (1 + jit(0.1))), jit(0.2))
    left_lobe_r = _ellipsoid_radius(p, (30.0 + jit(6.0), -32.0 + jit(4.0), 2.0 + jit(6.0)),
                                    (30.0, 16.0 * (1 + jit(0.15)), 32.0 * (1 + jit(0.15))), jit(0.3))
    liver = ((liver_r <= 1.0) | (left_lobe_r <= 1.0)) & visceral & (vb_d > vb_r + 6.0)

    # Spleen: a bumpy ellipsoid, left posterior, with a concave hilum facing the midline.
    s_centre = (15.0 + jit(10.0), 22.0 + jit(6.0), 50.0 + jit(6.0))
    s_semi = (34.0 * (1 + jit(0.15)), 38.0 * (1 + jit(0.15)), 21.0 * (1 + jit(0.15)))
    s_angle = np.deg2rad(-35.0) + jit(0.25)  # long axis runs from posterior-medial to anterior-lateral
    s_r = _ellipsoid_radius(p, s_centre, s_semi, s_angle)
    d = [p[i] - s_centre[i] for i in range(3)]
    norm = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + 1e-6
    bumps = np.zeros(shape_zyx)
    for _ in range(3):
        wave = rng.normal(size=3)
        wave *= rng.uniform(1.5, 3.0) / np.linalg.norm(wave)
        bumps += rng.uniform(0.03, 0.06) * np.cos(sum(wave[i] * d[i] / norm for i in range(3)) + rng.uniform(0, 6.3))
    # The hilum: a notch in the surface that faces anterior-medially (-y, -x).
    towards = np.array([jit(0.2), -0.5, -0.87])
    towards /= np.linalg.norm(towards)
    surface = 1.0 / np.linalg.norm((_rotation_z(s_angle) @ towards) / np.array(s_semi))  # centre-to-surface, mm
    hilum_centre = tuple(s_centre[i] + (surface + 3.0) * towards[i] for i in range(3))
    hilum_r = _ellipsoid_radius(p, hilum_centre, (15.0, 12.0, 10.0))
    spleen = (s_r <= 1.0 + bumps) & (hilum_r > 1.0) & visceral

    bone = (vertebral_body | cortical | ribs) & body
    tissue = np.full(shape_zyx, HU["air"])
    tissue[body] = HU["fat"]
    tissue[inner] = HU["soft_tissue"]
    tissue[liver] = HU["liver"]
    tissue[spleen] = HU["spleen"]
    tissue[(vb_d <= vb_r) & disc] = HU["disc"]
    tissue[canal] = HU["csf"]
    tissue[bone] = HU["cancellous_bone"]
    tissue[(cortical | rib_cortex) & body] = HU["cortical_bone"]

    # Partial volume: the PSF plus a box of the voxel's size (variance s^2 / 12), in voxels.
    sigma = [np.sqrt(PSF_SIGMA_MM ** 2 + s ** 2 / 12.0) / s for s in spacing_zyx]
    image = ndimage.gaussian_filter(tissue, sigma, mode="nearest")
    noise_sd = NOISE_SD_HU * np.sqrt(_NOISE_REFERENCE_MM3 / (sz * sy * sx))
    image += rng.normal(0.0, noise_sd, size=shape_zyx)
    hu = np.clip(np.rint(image), _HU_MIN, _HU_MAX).astype(np.int16)

    labels = np.zeros(shape_zyx, np.uint8)
    if extra_labels:
        labels[liver & ~spleen] = EXTRA_LABELS["liver"]
        labels[bone] = EXTRA_LABELS["bone"]
    labels[spleen & ~bone] = LABELS["spleen"]
    return Phantom(hu=hu, labels=labels, affine=phantom_affine(shape_zyx, spacing_zyx))


def write_nifti(phantom: Phantom, path: str | Path, *, labels: bool = False) -> Path:
    """Write the HU image (int16; or the label map, uint8, with ``labels``) with its affine as sform and qform."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = phantom.labels.astype(np.uint8) if labels else phantom.hu.astype(np.int16)
    img = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), phantom.affine)  # [z,y,x] -> [x,y,z]
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm")
    img.set_sform(phantom.affine, code="scanner")
    img.set_qform(phantom.affine, code="scanner")
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
    nib.save(img, str(path))
    return path


#: Compressed transfer syntaxes pydicom can encode losslessly (the last two need pylibjpeg plugins).
_LOSSLESS_ENCODINGS = (UID("1.2.840.10008.1.2.5"), UID("1.2.840.10008.1.2.4.90"), UID("1.2.840.10008.1.2.4.80"))
_SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def write_dicom_series(phantom: Phantom, folder: str | Path, *, series_description: str = "Phantom CT",
                       study_description: str = "CT Body", patient_name: str = "PHANTOM^DEMO",
                       patient_id: str = "PHANTOM-0001", study_uid: str | None = None, series_uid: str | None = None,
                       series_number: int = 1, transfer_syntax: str = ExplicitVRLittleEndian, modality: str = "CT",
                       frame_of_reference_uid: str | None = None) -> list[Path]:
    """Write the HU image as one single-frame image per slice (``slice_0001.dcm``, ... in z order).

    Stored values are unsigned, HU = stored - 1024 (RescaleSlope 1, RescaleIntercept -1024). ``transfer_syntax``
    may be an uncompressed one (Explicit/Implicit VR Little Endian, Deflated) or a lossless encoding that pydicom
    can write here (RLE Lossless always; JPEG 2000 Lossless and JPEG-LS Lossless with the pylibjpeg plugins).
    ``modality`` "MR" writes MR Image Storage instead (for series-selection tests; the pixels stay HU-like).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID,
                             generate_uid)

    ts = UID(transfer_syntax)
    if modality not in _SOP_CLASSES:
        raise ValueError(f"modality must be one of {sorted(_SOP_CLASSES)}, got {modality!r}")
    uncompressed = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
    if ts not in uncompressed and not ts.is_compressed:
        raise ValueError(f"transfer_syntax {ts} ({ts.name}) is not supported for writing")
    if ts.is_compressed and ts not in _LOSSLESS_ENCODINGS:
        raise ValueError(f"transfer_syntax {ts} ({ts.name}) is not a lossless encoding pydicom can write; "
                         f"use one of {', '.join(u.name for u in _LOSSLESS_ENCODINGS)}")

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    # Back from the RAS affine to DICOM's LPS vectors.
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ phantom.affine
    sx, sy, sz = np.linalg.norm(lps[:3, :3], axis=0)
    row_cos, col_cos, step = lps[:3, 0] / sx, lps[:3, 1] / sy, lps[:3, 2]
    normal = np.cross(row_cos, col_cos)
    stored = (phantom.hu.astype(np.int32) - RESCALE_INTERCEPT)
    if stored.min() < 0 or stored.max() > 4095:
        raise ValueError(f"HU outside [{_HU_MIN}, {_HU_MAX}] cannot be stored as 12-bit unsigned values")
    stored = stored.astype(np.uint16)

    paths = []
    for k in range(phantom.hu.shape[0]):
        position = lps[:3, 3] + k * step
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _SOP_CLASSES[modality]
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if ts.is_compressed else ts
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.SOPClassUID = _SOP_CLASSES[modality]
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
        ds.AccessionNumber = ""
        ds.Modality = modality
        ds.Manufacturer = "segmap synthetic phantom"
        ds.InstitutionName = "Not a patient"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.ManufacturerModelName = "segmap.demo.phantom"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = f"{sz:.6g}"
        ds.SpacingBetweenSlices = f"{np.linalg.norm(step):.6g}"
        ds.PatientPosition = "HFS"
        if modality == "CT":
            ds.KVP = "120"
            ds.ConvolutionKernel = "STANDARD"
        else:
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.RepetitionTime = "500"
            ds.EchoTime = "10"
            ds.EchoTrainLength = "1"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = int(series_number)
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6f}".rstrip("0").rstrip(".") or "0" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}".rstrip("0").rstrip(".") or "0" for v in (*row_cos, *col_cos)]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{float(np.dot(position, normal)):.6f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(phantom.hu.shape[1]), int(phantom.hu.shape[2])
        ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]  # row spacing (between rows), column spacing
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.RescaleIntercept = str(RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        if modality == "CT":
            ds.RescaleType = "HU"
        pixels = np.ascontiguousarray(stored[k])
        ds.PixelData = pixels.tobytes()
        if ts.is_compressed:
            ds.compress(ts, pixels, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = ts
        path = folder / f"slice_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_phantom_study(folder: str | Path, seed: int = 0, **phantom_kwargs) -> dict:
    """One phantom as ``folder/dicom/slice_*.dcm`` and ``folder/image.nii.gz``.

    ``phantom_kwargs`` go to :func:`make_phantom`, except the keywords of :func:`write_dicom_series` other than
    the phantom and folder, which go there. Returns ``folder``, ``dicom_dir``, ``dicom_files``, ``nifti``,
    ``study_uid``, ``series_uid``, ``frame_of_reference_uid`` and the ``phantom`` itself (for its labels).
    """
    from pydicom.uid import generate_uid

    dicom_keys = {"series_description", "study_description", "patient_name", "patient_id", "series_number",
                  "transfer_syntax", "modality", "study_uid", "series_uid", "frame_of_reference_uid"}
    dicom_kwargs = {k: phantom_kwargs.pop(k) for k in list(phantom_kwargs) if k in dicom_keys}
    uids = {k: dicom_kwargs.pop(k, None) or generate_uid()
            for k in ("study_uid", "series_uid", "frame_of_reference_uid")}
    folder = Path(folder)
    phantom = make_phantom(seed=seed, **phantom_kwargs)
    files = write_dicom_series(phantom, folder / "dicom", **uids, **dicom_kwargs)
    nifti = write_nifti(phantom, folder / "image.nii.gz")
    return {"folder": folder, "dicom_dir": folder / "dicom", "dicom_files": files, "nifti": nifti, **uids,
            "phantom": phantom}
