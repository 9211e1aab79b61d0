"""The output formats segmap can write, keyed by name, separate from the kind of input.

Adding a format is one module with a writer class (``write(labels, image, folder, provenance) -> Path``, see
:class:`Writer`) plus one line in :data:`FORMATS`. The writer's module is imported only when the format is used,
so listing formats (settings, ``--help``, the packager) stays cheap.

The packager's image variants are derived from this table: one variant per (input kind, format) pair the format
accepts, named after the input kind when the format is that kind's default, else ``<input kind>-<format>``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import SegmapError

if TYPE_CHECKING:  # pragma: no cover - types only: `segmap.settings` imports this module, and the `segmap` command
    # imports the settings before segmap.signals blocks SIGTERM; numpy (volume) must not start its threads before.
    from ..tasks import SegmentationTask
    from ..volume import Volume

#: Media type of each input kind (a MAP's app.json ``input.formats``).
INPUT_MEDIA_TYPES = {"dicom": "application/dicom", "nifti": "application/x-nifti"}
REPORT_MEDIA_TYPE = "application/json"
#: DICOM SEG types, the default first: binary (one frame per segment and slice) is what every viewer reads; labelmap
#: (one frame per slice, DICOM 2024) only newer ones. Declared here, below the settings that offer the choice.
SEG_TYPES = ("binary", "labelmap")
#: Whether a DICOM SEG leaves out frames without segmented voxels unless told otherwise (kept: smaller files are
#: not worth the viewers that misplace the remaining frames).
OMIT_EMPTY_FRAMES = False


@dataclass(frozen=True)
class Provenance:
    """What made a result, for the formats that record it (a DICOM SEG's Software Versions)."""

    segmap_version: str
    #: SHA-256 of the model's files (:func:`segmap.outputs.report.model_digest`).
    model_sha256: str

    @property
    def software_versions(self) -> list[str]:
        """segmap's version, then the model's short digest (the SEG names the model it came from)."""
        return [self.segmap_version, f"model sha256:{self.model_sha256[:16]}"]


class SourceImage(Protocol):
    """What a writer reads of the image a label map was computed from (:class:`segmap.run.values.InputImage`)."""

    #: ``[c, z, y, x]`` on the label map's grid; ``meta`` may hold a NIfTI input's header.
    volume: "Volume"
    #: DICOM input: the reference series' headers in the volume's z order; None for NIfTI input.
    reference_datasets: list | None
    #: DICOM input of a multi-modality task: the headers of each further input series (not the reference one).
    other_input_datasets: list | None


class Writer(Protocol):
    """Writes one run's label map in one format into a (staging) folder."""

    def write(self, labels: "Volume", image: SourceImage, folder: Path, provenance: Provenance) -> Path: ...


@dataclass(frozen=True)
class OutputFormat:
    name: str
    title: str
    media_type: str
    #: Input kinds this format can be written from.
    inputs: tuple[str, ...]
    #: Input kinds for which this is the format written when the output format is ``auto``.
    default_for: tuple[str, ...]
    #: ``module:Class`` of the writer; the class is built with ``(task, settings)`` (settings: the run's
    #: :class:`segmap.settings.Settings`, read by attribute; outputs sit below the settings and never import them).
    writer: str

    def make_writer(self, task: "SegmentationTask", settings: Any) -> Writer:
        module, _, cls = self.writer.partition(":")
        return getattr(importlib.import_module(module), cls)(task, settings)


FORMATS: dict[str, OutputFormat] = {f.name: f for f in (
    OutputFormat("dicom-seg", "DICOM SEG", "application/dicom", ("dicom",), ("dicom",),
                 "segmap.outputs.seg:DicomSegWriter"),
    OutputFormat("nifti", "NIfTI", "application/x-nifti", ("dicom", "nifti"), ("nifti",),
                 "segmap.outputs.nifti:NiftiWriter"),
)}


def output_format(name: str, input_kind: str) -> OutputFormat:
    """The format to write: ``name``, or the input kind's default for ``auto``; refuses impossible pairs."""
    if name == "auto":
        for f in FORMATS.values():
            if input_kind in f.default_for:
                return f
        raise SegmapError(f"no default output format for {input_kind} input")  # pragma: no cover - table bug
    if name not in FORMATS:
        raise SegmapError(f"unknown output format {name!r} (formats: {', '.join(FORMATS)})")
    f = FORMATS[name]
    if input_kind not in f.inputs:
        raise SegmapError(f"output format {name} needs {' or '.join(f.inputs)} input, but the input is {input_kind}")
    return f


@dataclass(frozen=True)
class Variant:
    """One MAP image: an input kind and the format written from it."""

    input_kind: str
    output_format: OutputFormat

    @property
    def name(self) -> str:
        if self.input_kind in self.output_format.default_for:
            return self.input_kind
        return f"{self.input_kind}-{self.output_format.name}"

    @property
    def title(self) -> str:
        return f"{self.input_kind.upper() if self.input_kind == 'dicom' else 'NIfTI'} in, {self.output_format.title} out"

    @property
    def media_types(self) -> tuple[list[str], list[str]]:
        return [INPUT_MEDIA_TYPES[self.input_kind]], [self.output_format.media_type, REPORT_MEDIA_TYPE]

    def settings(self) -> dict[str, Any]:
        return {"input_kind": self.input_kind, "output_format": self.output_format.name}


def variants() -> dict[str, Variant]:
    """Every (input kind, format) pair, by variant name: ``dicom``, ``nifti``, ``dicom-nifti``, ..."""
    out = {}
    for kind in INPUT_MEDIA_TYPES:
        for f in FORMATS.values():
            if kind in f.inputs:
                v = Variant(kind, f)
                out[v.name] = v
    return out
