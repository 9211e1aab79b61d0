"""``overlay.png``: the result a person can check at a glance.

A few axial slices and one coronal slice through the segmented structures, the image in grey, each segment in its
own colour (the task's ``recommended_display_rgb_value`` when set), with a legend giving each segment's volume in
mL. The picture carries nothing about the patient: the only text drawn is the legend, and the PNG is written
without text chunks.

Display follows the radiological convention whatever the acquisition orientation: the volume is reoriented to RAS
with nibabel from its affine, axial slices are shown from below (patient's right on the viewer's left, anterior at
the top), the coronal slice from the front (right on the left, superior at the top), and every panel is resampled
to square millimetres so that anisotropic voxels are not squashed.

Pillow draws it (already a runtime dependency through highdicom); matplotlib would add tens of MB to the image for
a picture this simple.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..volume import Volume
from .report import segment_statistics

#: The picture a person checks the result with, beside the outputs (settings.overlay).
OVERLAY_NAME = "overlay.png"

#: Colours for segments without ``recommended_display_rgb_value`` (distinct on grey and for common colour
#: blindness: Okabe-Ito, then a few more).
PALETTE = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (255, 255, 255), (153, 153, 51), (136, 34, 85), (68, 170, 153), (170, 68, 153))
#: Opacity of a segment's fill; its outline is drawn opaque, in exactly the segment's colour.
FILL_ALPHA = 0.4
PANEL_SIZE = 320
GAP = 6
FONT_SIZE = 15


@dataclass(frozen=True)
class Panel:
    """One slice in the picture: ``kind`` "axial" or "coronal", the slice's index along the RAS axis it cuts
    (S for axial, A for coronal) and its pixel box ``(left, top, right, bottom)`` in the PNG."""

    kind: str
    index: int
    box: tuple[int, int, int, int]


@dataclass
class Overlay:
    image: Any  # PIL.Image.Image
    panels: list[Panel]
    #: Every string drawn on the picture (the legend lines), in order.
    text: list[str]


def segment_colours(segments: Sequence[Any]) -> list[tuple[int, int, int]]:
    """Each segment's display colour: its ``color_rgb`` (the task's recommended value) or the palette's."""
    colours = []
    for i, s in enumerate(segments):
        rgb = getattr(s, "color_rgb", None)
        colours.append(tuple(int(c) for c in rgb) if rgb is not None else PALETTE[i % len(PALETTE)])
    return colours


def _ras(volume_zyx: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A ``[z, y, x]`` array as ``[R, A, S]`` (each axis increasing towards R, A, S) and its voxel size in mm."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)  # of the (x, y, z) voxel axes
    xyz = np.asarray(volume_zyx).transpose(2, 1, 0)
    ras = nib.orientations.apply_orientation(xyz, ornt)
    zooms = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return ras, zooms[np.argsort(ornt[:, 0])]


def _weighted_quantile_indices(areas: np.ndarray, quantiles: Sequence[float]) -> list[int]:
    cdf = np.cumsum(areas) / areas.sum()
    return [int(np.searchsorted(cdf, q)) for q in quantiles]


def choose_slices(labels_ras: np.ndarray, axial: int) -> tuple[list[int], int]:
    """Axial (S) indices that cut through the bulk of the segmented voxels (area-weighted quantiles) and the
    coronal (A) index through their middle; the volume's middle where nothing is segmented."""
    fg = labels_ras > 0
    if not fg.any():
        s = labels_ras.shape[2]
        return sorted({int(round((i + 1) * (s - 1) / (axial + 1))) for i in range(axial)}), labels_ras.shape[1] // 2
    per_s = fg.sum(axis=(0, 1)).astype(np.float64)
    axial_idx = sorted(set(_weighted_quantile_indices(per_s, [(i + 0.5) / axial for i in range(axial)])))
    coronal = _weighted_quantile_indices(fg.sum(axis=(0, 2)).astype(np.float64), [0.5])[0]
    return axial_idx, coronal


#: Grey-level window for CT (Hounsfield units): the usual soft-tissue window, level 40, width 400.
CT_WINDOW = (-160.0, 240.0)


def _window(image: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    """``window``, else the soft-tissue window for an image in Hounsfield units (air at about -1000), else the
    1st-99th percentile of the nonzero values (MR and other modalities have no fixed scale)."""
    if window is not None:
        return float(window[0]), float(window[1])
    values = image[image != 0] if np.any(image != 0) else image.ravel()
    lo, hi = np.percentile(values, [1.0, 99.0])
    if lo <= -900.0 and hi > 0:
        return CT_WINDOW
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _panel(image2d: np.ndarray, labels2d: np.ndarray, spacing_2d: tuple[float, float], mm_per_px: float,
           colours: Sequence[tuple[int, int, int]], window: tuple[float, float]):
    """One slice as an RGB PIL image; ``image2d``/``labels2d`` are [row, column] in display orientation."""
    from PIL import Image
    from scipy.ndimage import binary_erosion

    rows = max(1, int(round(image2d.shape[0] * spacing_2d[0] / mm_per_px)))
    cols = max(1, int(round(image2d.shape[1] * spacing_2d[1] / mm_per_px)))
    lo, hi = window
    grey = np.clip((image2d.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255
    grey = np.asarray(Image.fromarray(grey.astype(np.uint8)).resize((cols, rows), Image.BILINEAR))
    lab = np.asarray(Image.fromarray(labels2d.astype(np.int32)).resize((cols, rows), Image.NEAREST))
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    for value, colour in enumerate(colours, start=1):
        mask = lab == value
        if not mask.any():
            continue
        c = np.asarray(colour, dtype=np.float32)
        rgb[mask] = (1 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * c
        rgb[mask & ~binary_erosion(mask)] = c  # the outline: exactly the segment's colour
    return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")


def legend_lines(segments: Sequence[Any], volumes_ml: Sequence[float]) -> list[str]:
    """The legend: ``"<segment name>: <volume> mL"`` per segment."""
    return [f"{getattr(s, 'label', s)}: {v:.1f} mL" for s, v in zip(segments, volumes_ml)]


def render_overlay(image: Volume, labels: Volume, segments: Sequence[Any], *,
                   volumes_ml: Sequence[float] | None = None, axial_slices: int = 3,
                   window: tuple[float, float] | None = None) -> Overlay:
    """The overlay picture (see the module docstring) of ``labels`` (value ``i`` = ``segments[i - 1]``, a task
    :class:`~segmap.tasks.Segment` or a name) on channel 0 of ``image``; both on the same grid.

    ``volumes_ml``: per segment (default: computed from ``labels`` and its affine). ``window``: grey-level window
    (default: soft tissue for CT, else the 1st-99th percentile of the image's nonzero values).
    """
    from PIL import Image, ImageDraw, ImageFont

    if labels.shape_zyx != image.shape_zyx:
        raise ValueError(f"labels grid {labels.shape_zyx} differs from the image grid {image.shape_zyx}")
    label_zyx = np.asarray(labels.array[0])
    if volumes_ml is None:
        volumes_ml = [s["volume_ml"] for s in segment_statistics(label_zyx, labels.affine, list(
            getattr(s, "label", s) for s in segments))]
    if len(volumes_ml) != len(segments):
        raise ValueError(f"{len(volumes_ml)} volumes for {len(segments)} segments")
    colours = segment_colours(segments)
    img_ras, zooms = _ras(np.asarray(image.array[0]), image.affine)
    lab_ras, _ = _ras(label_zyx, image.affine)
    axial_idx, coronal_idx = choose_slices(lab_ras, axial_slices)
    win = _window(img_ras, window)
    extent = np.asarray(img_ras.shape) * zooms
    mm_per_px = float(extent.max()) / PANEL_SIZE

    # Display orientation: rows from anterior (axial) / superior (coronal) down, columns from the patient's right.
    tiles = []
    for k in axial_idx:
        tiles.append(("axial", k, _panel(img_ras[::-1, ::-1, k].T, lab_ras[::-1, ::-1, k].T, (zooms[1], zooms[0]),
                                         mm_per_px, colours, win)))
    tiles.append(("coronal", coronal_idx, _panel(img_ras[::-1, coronal_idx, ::-1].T,
                                                 lab_ras[::-1, coronal_idx, ::-1].T, (zooms[2], zooms[0]),
                                                 mm_per_px, colours, win)))

    font = ImageFont.load_default(size=FONT_SIZE)
    text = legend_lines(segments, volumes_ml)
    line_h = FONT_SIZE + 6
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((int(probe.textlength(t, font=font)) for t in text), default=0) + line_h + 2 * GAP
    width = max(sum(t[2].width for t in tiles) + GAP * (len(tiles) + 1), text_w)
    height_panels = max(t[2].height for t in tiles)
    height = GAP + height_panels + GAP + len(text) * line_h + GAP
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    panels = []
    x = GAP
    for kind, index, tile in tiles:
        top = GAP + (height_panels - tile.height) // 2
        canvas.paste(tile, (x, top))
        panels.append(Panel(kind, int(index), (x, top, x + tile.width, top + tile.height)))
        x += tile.width + GAP
    draw = ImageDraw.Draw(canvas)
    y = GAP + height_panels + GAP
    for line, colour in zip(text, colours):
        draw.rectangle((GAP, y + 3, GAP + FONT_SIZE - 2, y + FONT_SIZE + 1), fill=colour)
        draw.text((GAP + line_h, y), line, fill=(255, 255, 255), font=font)
        y += line_h
    return Overlay(canvas, panels, text)


def write_overlay(image: Volume, labels: Volume, segments: Sequence[Any], path: str | Path, *,
                  volumes_ml: Sequence[float] | None = None, axial_slices: int = 3,
                  window: tuple[float, float] | None = None) -> Path:
    """Render :func:`render_overlay` and save it as a PNG at ``path`` (no text chunks, no metadata)."""
    path = Path(path)
    overlay = render_overlay(image, labels, segments, volumes_ml=volumes_ml, axial_slices=axial_slices,
                             window=window)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay.image.save(path, format="PNG", optimize=True)
    return path
