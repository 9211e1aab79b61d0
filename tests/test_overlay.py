"""``overlay.png``: size, each segment's colour where its mask is (in radiological orientation), the legend with
volumes in mL, and nothing about the patient."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segmap.demo.phantom import make_phantom, write_phantom_study
from segmap.outputs.overlay import PALETTE, render_overlay, write_overlay
from segmap.outputs.report import segment_statistics
from segmap.tasks import Code, Segment
from segmap.volume import Volume

NAME = "Rembrandt^Harmensz"
SPLEEN_RGB, LIVER_RGB, BONE_RGB = (157, 108, 162), (221, 130, 101), (241, 214, 145)


def segment(label: str, rgb=None) -> Segment:
    return Segment(label, Code("123037004", "SCT", "Anatomical Structure"), Code("1", "SCT", label), "test",
                   color_rgb=rgb)


SEGMENTS = [segment("Spleen", SPLEEN_RGB), segment("Liver", LIVER_RGB), segment("Bone", BONE_RGB)]


@pytest.fixture(scope="module")
def phantom():
    p = make_phantom((40, 96, 96), (3.0, 2.0, 2.0), seed=3, extra_labels=True)
    return Volume(p.hu[None].astype(np.float32), p.affine), Volume(p.labels[None].astype(np.uint8), p.affine)


def pixels_of(img: Image.Image, box, rgb) -> np.ndarray:
    """(row, column) of the pixels of exactly colour ``rgb`` inside ``box``, relative to the box."""
    left, top, right, bottom = box
    a = np.asarray(img)[top:bottom, left:right]
    return np.argwhere(np.all(a == np.asarray(rgb, dtype=np.uint8), axis=2))


def text_chunks(png: bytes) -> list[bytes]:
    chunks, pos = [], 8
    while pos < len(png):
        length = int.from_bytes(png[pos:pos + 4], "big")
        kind = png[pos + 4:pos + 8]
        if kind in (b"tEXt", b"zTXt", b"iTXt", b"eXIf"):
            chunks.append(kind)
        pos += 12 + length
    return chunks


def test_overlay_size_panels_and_legend(tmp_path, phantom):
    image, labels = phantom
    path = write_overlay(image, labels, SEGMENTS, tmp_path / "overlay.png")
    png = Image.open(path)
    assert png.format == "PNG" and png.mode == "RGB"
    overlay = render_overlay(image, labels, SEGMENTS)
    assert png.size == overlay.image.size and 600 <= png.size[0] <= 2000 and 300 <= png.size[1] <= 800
    assert [p.kind for p in overlay.panels] == ["axial"] * 3 + ["coronal"]
    # square millimetres: the axial panel is 192 x 192 mm, the coronal one 192 mm wide and 120 mm high
    ax, cor = overlay.panels[0].box, overlay.panels[3].box
    assert ax[2] - ax[0] == ax[3] - ax[1] == 320
    assert cor[2] - cor[0] == 320 and cor[3] - cor[1] == 200
    stats = segment_statistics(labels.array[0], labels.affine, ["Spleen", "Liver", "Bone"])
    assert overlay.text == [f"{s['name']}: {s['volume_ml']:.1f} mL" for s in stats]
    assert all(s["volume_ml"] > 1 for s in stats)


def test_segment_colours_appear_where_the_masks_are(phantom):
    """The phantom's liver lies on the patient's right, its spleen on the left and the spine posterior: in
    radiological display the liver's colour is left of the spleen's on the axial and coronal panels, and the spine's
    (bone) colour in the lower, posterior half of the axial panels."""
    image, labels = phantom
    overlay = render_overlay(image, labels, SEGMENTS)
    img = overlay.image
    for panel in overlay.panels:
        width, height = panel.box[2] - panel.box[0], panel.box[3] - panel.box[1]
        liver, spleen = pixels_of(img, panel.box, LIVER_RGB), pixels_of(img, panel.box, SPLEEN_RGB)
        assert len(liver) and len(spleen), panel
        assert liver[:, 1].mean() < width / 2 < spleen[:, 1].mean(), panel
        if panel.kind == "axial":
            bone = pixels_of(img, panel.box, BONE_RGB)
            assert len(bone) and np.median(bone[:, 0]) > height / 2, panel


def test_superior_is_up_and_anterior_is_up(phantom):
    image, _ = phantom
    # value 1: a block in the patient's right-anterior-superior corner; value 2: left-posterior-inferior
    lab = np.zeros(image.shape_zyx, np.uint8)
    z, y, x = image.shape_zyx
    # the phantom grid is axial LPS: x increases to the patient's left, y posterior, z superior
    lab[3 * z // 4:, : y // 3, : x // 2] = 1  # larger than block 2, so the coronal slice cuts it
    lab[: z // 4, 2 * y // 3:, 2 * x // 3:] = 2
    overlay = render_overlay(image, image.with_array(lab), [segment("a", (255, 0, 0)), segment("b", (0, 0, 255))],
                             axial_slices=2)
    for panel in overlay.panels:
        w, h = panel.box[2] - panel.box[0], panel.box[3] - panel.box[1]
        for rgb, corner in (((255, 0, 0), (0, 0)), ((0, 0, 255), (1, 1))):
            found = pixels_of(overlay.image, panel.box, rgb)
            if not len(found):
                continue
            rows_low, cols_low = found[:, 0] < h / 2, found[:, 1] < w / 2
            assert (rows_low == (corner[0] == 0)).all() and (cols_low == (corner[1] == 0)).all(), panel
    kinds = {p.kind for p in overlay.panels if len(pixels_of(overlay.image, p.box, (255, 0, 0)))}
    assert kinds == {"axial", "coronal"}


def test_palette_for_segments_without_a_display_colour(phantom):
    image, labels = phantom
    overlay = render_overlay(image, labels, ["spleen", "liver", "bone"])
    assert overlay.text[0].startswith("spleen: ")
    assert any(len(pixels_of(overlay.image, p.box, PALETTE[1])) for p in overlay.panels)


def test_no_patient_data_in_the_picture(tmp_path):
    from segmap.dicom import scan_dicom_folder, series_to_volume

    study = write_phantom_study(tmp_path / "study", seed=2, shape_zyx=(24, 64, 64), spacing_zyx=(3.0, 3.0, 3.0),
                                extra_labels=True, patient_name=NAME, patient_id="ID-4242")
    (series,) = scan_dicom_folder(study["dicom_dir"]).series
    volume = series_to_volume(series)
    labels = study["phantom"].labels.astype(np.uint8)
    assert volume.shape_zyx == labels.shape and np.allclose(volume.affine, study["phantom"].affine)
    path = write_overlay(volume, volume.with_array(labels), SEGMENTS, tmp_path / "overlay.png")
    png = path.read_bytes()
    assert text_chunks(png) == []
    with Image.open(path) as img:
        assert not getattr(img, "text", {}) and not {k for k in img.info if k not in ("dpi", "gamma")}
    raw = zlib.decompress(b"".join(png[i + 8:i + 8 + int.from_bytes(png[i:i + 4], "big")]
                                   for i in _chunk_offsets(png, b"IDAT")))
    for needle in (b"Rembrandt", b"Harmensz", b"ID-4242"):
        assert needle not in png and needle not in raw
    drawn = render_overlay(volume, volume.with_array(labels), SEGMENTS).text
    assert [line.split(":")[0] for line in drawn] == ["Spleen", "Liver", "Bone"]
    assert all(line.endswith(" mL") for line in drawn)


def _chunk_offsets(png: bytes, kind: bytes) -> list[int]:
    offsets, pos = [], 8
    while pos < len(png):
        length = int.from_bytes(png[pos:pos + 4], "big")
        if png[pos + 4:pos + 8] == kind:
            offsets.append(pos)
        pos += 12 + length
    return offsets


def test_labels_on_another_grid_are_refused(phantom):
    image, _ = phantom
    other = Volume(np.zeros((1, 4, 4, 4), np.uint8), image.affine)
    with pytest.raises(ValueError, match="differs from the image grid"):
        render_overlay(image, other, SEGMENTS)


def test_empty_segmentation_still_renders(tmp_path, phantom):
    image, labels = phantom
    empty = image.with_array(np.zeros(image.shape_zyx, np.uint8))
    overlay = render_overlay(image, empty, SEGMENTS)
    assert overlay.text == ["Spleen: 0.0 mL", "Liver: 0.0 mL", "Bone: 0.0 mL"]
    assert len({p.index for p in overlay.panels if p.kind == "axial"}) == 3
    assert Path(write_overlay(image, empty, SEGMENTS, tmp_path / "o.png")).stat().st_size > 1000
