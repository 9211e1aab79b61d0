"""Segmentation Task files: the MAIA/MONet YAML that names a model's inputs and describes its segments.

A file holds one or more tasks under a top-level ``tasks`` mapping::

    tasks:
      Spleen:
        Modalities:
          image: {File_Pattern: ".nii.gz", Rules_Text: '{"selections": [...]}'}
        Reference_Modality: image        # optional, default: the first modality
        Segments:                        # Segments[i-1] describes label value i
          - segment_label: Spleen
            segmented_property_category: {code: "123037004", scheme: SCT, meaning: Anatomical Structure}
            segmented_property_type: {code: "78961009", scheme: SCT, meaning: Spleen}
            algorithm_name: my-spleen-model

Everything is checked when the file is read, so the rest of segmap works with :class:`SegmentationTask` values that
are known to be well formed. Every problem raises :class:`~segmap.errors.TaskFileError` with one line naming the file,
the task and the key, and saying what was expected. Keys are matched exactly as the MAIA format spells them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydicom.datadict import tag_for_keyword

from .dicom.selection import SelectionRules
from .errors import TaskFileError

TOP_LEVEL_KEYS = ("tasks",)
TASK_KEYS = ("Modalities", "Segments", "Reference_Modality")
MODALITY_KEYS = ("File_Pattern", "Rules_Text")
SEGMENT_REQUIRED_KEYS = ("segment_label", "segmented_property_category", "segmented_property_type", "algorithm_name")
SEGMENT_OPTIONAL_KEYS = (
    "algorithm_version",
    "segmented_property_type_modifier",
    "anatomic_region",
    "recommended_display_rgb_value",
)
CODE_KEYS = ("code", "scheme", "meaning")
SELECTION_KEYS = ("name", "conditions")


@dataclass(frozen=True)
class Code:
    """A DICOM coded concept (code value, coding scheme designator, code meaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Segment:
    """What one label value of the model output is, in DICOM SEG terms."""

    label: str
    category: Code
    type: Code
    algorithm_name: str
    algorithm_version: str = "1.0"
    type_modifier: Code | None = None
    anatomic_region: Code | None = None
    #: Recommended display colour, sRGB 0-255.
    color_rgb: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Modality:
    """One model input: how to find it among NIfTI files and among DICOM series."""

    key: str
    #: NIfTI variant: a file-name pattern (``File_Pattern``).
    file_pattern: str | None
    #: DICOM input: the ``Rules_Text``, parsed and compiled
    #: (``{"selections": [{"name": ..., "conditions": {...}}, ...]}``, see :mod:`segmap.dicom.selection`).
    rules: SelectionRules | None


@dataclass(frozen=True)
class SegmentationTask:
    name: str
    source: Path
    #: In file order, which must be the model's input (channel) order.
    modalities: tuple[Modality, ...]
    #: ``segments[i - 1]`` describes label value ``i``.
    segments: tuple[Segment, ...]
    #: The modality whose grid the others are resampled to and which a DICOM SEG references.
    reference_modality: str

    @property
    def modality_keys(self) -> tuple[str, ...]:
        return tuple(m.key for m in self.modalities)

    def modality(self, key: str) -> Modality:
        for m in self.modalities:
            if m.key == key:
                return m
        raise KeyError(key)


# --------------------------------------------------------------------------------------------------- YAML reading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            continue  # the base constructor reports unhashable keys
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line out of PyYAML's multi-line messages: what went wrong and where."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def _read_tasks_mapping(path: Path) -> dict:
    if not path.exists():
        raise TaskFileError(f"{path}: task file not found")
    if not path.is_file():
        raise TaskFileError(f"{path}: task file is not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskFileError(f"{path}: task file is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise TaskFileError(f"{path}: cannot read the task file ({e.strerror or e})") from e
    try:
        doc = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise TaskFileError(f"{path}: not valid YAML ({_yaml_problem(e)})") from e
    if not isinstance(doc, dict) or "tasks" not in doc:
        raise TaskFileError(f"{path}: expected a top-level 'tasks:' mapping of task name -> task (MAIA Segmentation "
                            "Task format)")
    extra = [k for k in doc if k not in TOP_LEVEL_KEYS]
    if extra:
        raise TaskFileError(f"{path}: unknown top-level key(s) {_names(extra)}; allowed: {_names(TOP_LEVEL_KEYS)}")
    tasks = doc["tasks"]
    if not isinstance(tasks, dict) or not tasks:
        raise TaskFileError(f"{path}: 'tasks' must be a non-empty mapping of task name -> task, "
                            f"got {_type_name(tasks)}")
    for name in tasks:
        if not isinstance(name, str) or not name.strip():
            raise TaskFileError(f"{path}: task names must be non-empty strings, got {name!r}")
    return tasks


def _names(keys) -> str:
    return ", ".join(repr(str(k)) for k in keys)


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)) and not value:
        return "an empty mapping" if isinstance(value, dict) else "an empty list"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------------ public functions


def list_tasks(path: str | Path) -> list[str]:
    """The task names a Segmentation Task file holds, in file order."""
    return list(_read_tasks_mapping(Path(path)))


def load_task(path: str | Path, task_name: str | None = None) -> SegmentationTask:
    """Read and check one task of a Segmentation Task file.

    ``task_name`` may be omitted when the file holds exactly one task.
    """
    path = Path(path)
    tasks = _read_tasks_mapping(path)
    if task_name is None:
        if len(tasks) > 1:
            raise TaskFileError(f"{path}: the file holds {len(tasks)} tasks ({_names(tasks)}); "
                                f"choose one with a task name (--task-name)")
        task_name = next(iter(tasks))
    elif task_name not in tasks:
        raise TaskFileError(f"{path}: no task named '{task_name}'; available: {_names(tasks)}")
    return _TaskParser(path, task_name).parse(tasks[task_name])


class _TaskParser:
    """Checks one task's document; ``where`` strings locate each problem for the message."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name

    def error(self, where: str, what: str) -> TaskFileError:
        where = f" {where}" if where else ""
        return TaskFileError(f"{self.path}: task '{self.name}'{where}: {what}")

    def mapping(self, value: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.error(where, f"expected a mapping with keys {_names(allowed)}, got {_type_name(value)}")
        unknown = [k for k in value if k not in allowed]
        if unknown:
            raise self.error(where, f"unknown key(s) {_names(unknown)}; allowed: {_names(allowed)}")
        missing = [k for k in required if k not in value]
        if missing:
            raise self.error(where, f"missing key(s) {_names(missing)}")
        return value

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            hint = " (quote it in the YAML)" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            raise self.error(where, f"expected a non-empty string, got {_type_name(value)} {value!r}{hint}")
        return value

    def parse(self, doc: Any) -> SegmentationTask:
        doc = self.mapping(doc, "", TASK_KEYS, required=("Modalities", "Segments"))
        modalities = self.modalities(doc["Modalities"])
        segments = self.segments(doc["Segments"])
        keys = [m.key for m in modalities]
        if "Reference_Modality" in doc and doc["Reference_Modality"] is not None:
            reference = self.string(doc["Reference_Modality"], "key 'Reference_Modality'")
            if reference not in keys:
                raise self.error("key 'Reference_Modality'",
                                 f"'{reference}' is not one of the modality keys {_names(keys)}")
        else:
            reference = keys[0]
        return SegmentationTask(self.name, self.path, tuple(modalities), tuple(segments), reference)

    # ---- modalities

    def modalities(self, doc: Any) -> list[Modality]:
        if not isinstance(doc, dict) or not doc:
            raise self.error("key 'Modalities'", "expected a non-empty mapping of modality key -> "
                             f"{{File_Pattern, Rules_Text}}, got {_type_name(doc)}")
        return [self.modality(key, value) for key, value in doc.items()]

    def modality(self, key: Any, doc: Any) -> Modality:
        if not isinstance(key, str) or not key.strip():
            raise self.error("key 'Modalities'", f"modality keys must be non-empty strings, got {key!r}")
        where = f"modality '{key}'"
        if doc is None:
            doc = {}
        doc = self.mapping(doc, where, MODALITY_KEYS)
        pattern = doc.get("File_Pattern")
        rules_doc = doc.get("Rules_Text")
        if pattern is None and rules_doc is None:
            raise self.error(where, "needs 'File_Pattern' (NIfTI input) and/or 'Rules_Text' (DICOM input)")
        if pattern is not None:
            pattern = self.string(pattern, f"{where} key 'File_Pattern'")
        rules = self.rules(rules_doc, f"{where} key 'Rules_Text'", key) if rules_doc is not None else None
        return Modality(key, pattern, rules)

    def rules(self, doc: Any, where: str, key: str) -> SelectionRules:
        # MAIA files carry the rules as a JSON string; a YAML mapping of the same shape is accepted as well.
        if isinstance(doc, str):
            try:
                doc = json.loads(doc)
            except json.JSONDecodeError as e:
                raise self.error(where, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected "
                                 '{"selections": [{"name": ..., "conditions": {...}}]}') from e
        shape = 'expected {"selections": [{"name": ..., "conditions": {...}}, ...]}'
        if not isinstance(doc, dict) or set(doc) != {"selections"}:
            got = f"keys {_names(doc)}" if isinstance(doc, dict) else _type_name(doc)
            raise self.error(where, f"{shape}, got {got}")
        selections = doc["selections"]
        if not isinstance(selections, list) or not selections:
            raise self.error(where, f"'selections' must be a non-empty list; {shape}")
        for i, sel in enumerate(selections):
            at = f"{where} selections[{i}]"
            if not isinstance(sel, dict) or set(sel) - set(SELECTION_KEYS) or "conditions" not in sel:
                got = f"keys {_names(sel)}" if isinstance(sel, dict) else _type_name(sel)
                raise self.error(at, f'expected {{"name": ..., "conditions": {{...}}}}, got {got}')
            if "name" in sel and not isinstance(sel["name"], str):
                raise self.error(at, f"'name' must be a string, got {_type_name(sel['name'])}")
            self.conditions(sel["conditions"], at)
        try:
            return SelectionRules(doc, key)
        except TaskFileError as e:  # names the selection and the condition; this adds the file and the task
            raise self.error(where, str(e)) from None

    def conditions(self, conditions: Any, where: str) -> None:
        if not isinstance(conditions, dict) or not conditions:
            raise self.error(where, "'conditions' must be a non-empty mapping of DICOM keyword -> value, "
                             f"got {_type_name(conditions)}")
        for keyword, value in conditions.items():
            if tag_for_keyword(keyword) is None:
                raise self.error(where, f"condition '{keyword}' is not a DICOM attribute keyword "
                                 "(e.g. 'SeriesDescription', 'Modality')")
            scalars = (str, int, float)
            ok = isinstance(value, scalars) or (
                isinstance(value, list) and value and all(isinstance(v, scalars) for v in value))
            if not ok or isinstance(value, bool):
                raise self.error(where, f"condition '{keyword}' must be a string, a number or a non-empty list "
                                 f"of them, got {_type_name(value)}")

    # ---- segments

    def segments(self, doc: Any) -> list[Segment]:
        if not isinstance(doc, list) or not doc:
            raise self.error("key 'Segments'", "expected a non-empty list of segments (Segments[i-1] describes "
                             f"label value i), got {_type_name(doc)}")
        segments = [self.segment(i, s) for i, s in enumerate(doc)]
        seen: dict[str, int] = {}
        for i, s in enumerate(segments):
            if s.label in seen:
                raise self.error(f"Segments[{i}] key 'segment_label'",
                                 f"duplicate label '{s.label}' (also Segments[{seen[s.label]}]); labels must be unique")
            seen[s.label] = i
        return segments

    def segment(self, i: int, doc: Any) -> Segment:
        where = f"Segments[{i}]"
        doc = self.mapping(doc, where, SEGMENT_REQUIRED_KEYS + SEGMENT_OPTIONAL_KEYS, required=SEGMENT_REQUIRED_KEYS)
        optional: dict[str, Any] = {}
        if doc.get("algorithm_version") is not None:
            optional["algorithm_version"] = self.string(doc["algorithm_version"], f"{where} key 'algorithm_version'")
        if doc.get("segmented_property_type_modifier") is not None:
            optional["type_modifier"] = self.code(doc["segmented_property_type_modifier"], where,
                                                  "segmented_property_type_modifier")
        if doc.get("anatomic_region") is not None:
            optional["anatomic_region"] = self.code(doc["anatomic_region"], where, "anatomic_region")
        if doc.get("recommended_display_rgb_value") is not None:
            optional["color_rgb"] = self.rgb(doc["recommended_display_rgb_value"],
                                             f"{where} key 'recommended_display_rgb_value'")
        return Segment(
            label=self.string(doc["segment_label"], f"{where} key 'segment_label'"),
            category=self.code(doc["segmented_property_category"], where, "segmented_property_category"),
            type=self.code(doc["segmented_property_type"], where, "segmented_property_type"),
            algorithm_name=self.string(doc["algorithm_name"], f"{where} key 'algorithm_name'"),
            **optional,
        )

    def code(self, doc: Any, segment: str, key: str) -> Code:
        doc = self.mapping(doc, f"{segment} key '{key}'", CODE_KEYS, required=CODE_KEYS)
        value, scheme, meaning = (self.string(doc[k], f"{segment} key '{key}.{k}'") for k in CODE_KEYS)
        return Code(value.strip(), scheme.strip(), meaning.strip())

    def rgb(self, doc: Any, where: str) -> tuple[int, int, int]:
        if (not isinstance(doc, list) or len(doc) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in doc)):
            raise self.error(where, f"expected [r, g, b] with three integers 0-255, got {doc!r}")
        return (doc[0], doc[1], doc[2])
