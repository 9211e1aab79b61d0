"""Segmentation Task files: the shipped examples load, and every malformed file fails with a one-line message that
names the file, the task and the key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

from segmap.errors import SegmapError, TaskFileError
from segmap.tasks import Code, Modality, Segment, SegmentationTask, list_tasks, load_task

RULES = {"selections": [{"name": "CT Series", "conditions": {"Modality": "(?i)CT", "SeriesDescription": "(.*?)"}}]}
CATEGORY = {"code": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}


def base_doc() -> dict:
    return {"tasks": {"Spleen": {
        "Modalities": {"image": {"File_Pattern": ".nii.gz", "Rules_Text": json.dumps(RULES)}},
        "Segments": [{
            "segment_label": "Spleen",
            "segmented_property_category": dict(CATEGORY),
            "segmented_property_type": {"code": "78961009", "scheme": "SCT", "meaning": "Spleen"},
            "algorithm_name": "test-algo",
        }],
    }}}


def write(tmp_path: Path, doc, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def task_error(path: Path, task_name: str | None = None) -> str:
    with pytest.raises(TaskFileError) as info:
        load_task(path, task_name)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


# ------------------------------------------------------------------------------------------------- shipped files


def test_spleen_example_loads_as_the_demo_models_task():
    task = load_task(ROOT / "tasks" / "spleen.yaml")
    assert task.name == "Spleen"
    assert task.modality_keys == ("image",)
    assert task.reference_modality == "image"
    image = task.modalities[0]
    assert image.file_pattern == ".nii.gz"
    assert image.rules["selections"][0]["conditions"]["Modality"] == "(?i)CT"
    (spleen,) = task.segments
    assert spleen.label == "Spleen"
    assert spleen.category == Code("123037004", "SCT", "Anatomical Structure")
    assert spleen.type == Code("78961009", "SCT", "Spleen")
    assert spleen.algorithm_name == "segmap-demo-spleen"
    assert spleen.algorithm_version == "1.0"


def test_brain_tumour_example_has_four_mr_modalities_in_channel_order():
    task = load_task(ROOT / "tasks" / "brain_tumour.yaml")
    assert task.modality_keys == ("T1C", "T1N", "T2F", "T2W")
    assert task.reference_modality == "T1C"
    assert all(m.file_pattern and m.rules for m in task.modalities)
    assert len(task.segments) == 3
    assert len({s.label for s in task.segments}) == 3
    assert task.segments[2].type_modifier is not None
    assert all(s.anatomic_region == Code("12738006", "SCT", "Brain") for s in task.segments)


def test_brain_tumour_rules_pick_each_series_description_once():
    import re

    task = load_task(ROOT / "tasks" / "brain_tumour.yaml")
    patterns = {m.key: m.rules["selections"][0]["conditions"]["SeriesDescription"] for m in task.modalities}
    expected = {"T1 POST GD": "T1C", "t1_mprage": "T1N", "AX FLAIR": "T2F", "T2 TSE AX": "T2W", "t1ce": "T1C",
                "t2f": "T2F", "t2w": "T2W"}
    for description, key in expected.items():
        assert [k for k, p in patterns.items() if re.search(p, description)] == [key], description


# --------------------------------------------------------------------------------------------------- good inputs


def test_single_task_needs_no_name_and_optional_fields_are_read(tmp_path):
    doc = base_doc()
    seg = doc["tasks"]["Spleen"]["Segments"][0]
    seg.update(algorithm_version="2.1", recommended_display_rgb_value=[1, 2, 3],
               anatomic_region={"code": "818981001", "scheme": "SCT", "meaning": "Abdomen"},
               segmented_property_type_modifier={"code": "7771000", "scheme": "SCT", "meaning": "Left"})
    task = load_task(write(tmp_path, doc))
    assert isinstance(task, SegmentationTask)
    assert task.source == tmp_path / "task.yaml"
    assert task.modalities == (Modality("image", ".nii.gz", RULES),)
    assert task.segments[0] == Segment(
        label="Spleen", category=Code(**{"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}),
        type=Code("78961009", "SCT", "Spleen"), algorithm_name="test-algo", algorithm_version="2.1",
        type_modifier=Code("7771000", "SCT", "Left"), anatomic_region=Code("818981001", "SCT", "Abdomen"),
        color_rgb=(1, 2, 3))


def test_modality_with_only_one_variant_is_accepted(tmp_path):
    doc = base_doc()
    doc["tasks"]["Spleen"]["Modalities"] = {"a": {"File_Pattern": "_a.nii.gz"}, "b": {"Rules_Text": json.dumps(RULES)}}
    task = load_task(write(tmp_path, doc))
    assert task.modalities == (Modality("a", "_a.nii.gz", None), Modality("b", None, RULES))
    assert task.reference_modality == "a"


def test_several_tasks_pick_by_name_and_keep_file_order(tmp_path):
    doc = base_doc()
    other = copy.deepcopy(doc["tasks"]["Spleen"])
    other["Segments"][0]["segment_label"] = "Liver"
    doc["tasks"] = {"Zeta": doc["tasks"]["Spleen"], "Liver": other}
    path = write(tmp_path, doc)
    assert list_tasks(path) == ["Zeta", "Liver"]
    assert load_task(path, "Liver").segments[0].label == "Liver"


def test_rules_may_be_a_yaml_mapping(tmp_path):
    doc = base_doc()
    doc["tasks"]["Spleen"]["Modalities"]["image"]["Rules_Text"] = RULES
    assert load_task(write(tmp_path, doc)).modalities[0].rules == RULES


# ------------------------------------------------------------------------------------------------ file-level errors


def test_missing_file(tmp_path):
    assert "not found" in task_error(tmp_path / "nope.yaml")


def test_not_yaml(tmp_path):
    message = task_error(write(tmp_path, "tasks:\n  Spleen: [unclosed\n"))
    assert "not valid YAML" in message and "line" in message


def test_binary_file(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert "not UTF-8" in task_error(path)


@pytest.mark.parametrize("text", ["just a string\n", "- a\n- list\n", "other: {}\n", ""])
def test_no_top_level_tasks_mapping(tmp_path, text):
    assert "top-level 'tasks:'" in task_error(write(tmp_path, text))


def test_empty_tasks_mapping(tmp_path):
    assert "non-empty mapping of task name" in task_error(write(tmp_path, "tasks: {}\n"))


def test_unknown_top_level_key(tmp_path):
    doc = base_doc()
    doc["task"] = {}
    message = task_error(write(tmp_path, doc))
    assert "'task'" in message and "allowed: 'tasks'" in message


def test_duplicate_yaml_keys_are_refused(tmp_path):
    text = yaml.safe_dump(base_doc(), sort_keys=False).replace(
        "    Segments:", "    Segments: []\n    Segments:")
    message = task_error(write(tmp_path, text))
    assert "duplicate key 'Segments'" in message


def test_several_tasks_and_no_name_lists_them(tmp_path):
    doc = base_doc()
    doc["tasks"]["Liver"] = copy.deepcopy(doc["tasks"]["Spleen"])
    path = write(tmp_path, doc)
    message = task_error(path)
    assert "2 tasks" in message and "'Spleen'" in message and "'Liver'" in message and "task name" in message
    with pytest.raises(TaskFileError):
        load_task(path, "")


def test_unknown_task_name_lists_available(tmp_path):
    message = task_error(write(tmp_path, base_doc()), "Liver")
    assert "no task named 'Liver'" in message and "available: 'Spleen'" in message


def test_errors_are_segmap_errors_with_exit_code_2(tmp_path):
    with pytest.raises(SegmapError) as info:
        load_task(tmp_path / "nope.yaml")
    assert info.value.exit_code == 2


# ------------------------------------------------------------------------------------------------ task-level errors


def _mutate(fn):
    doc = base_doc()
    fn(doc["tasks"]["Spleen"])
    return doc


def _seg(task):
    return task["Segments"][0]


def _mod(task):
    return task["Modalities"]["image"]


CASES = {
    # id: (mutation, substrings the message must hold besides file and task)
    "task-unknown-key": (lambda t: t.update(Segmentz=[]),
                         ["'Segmentz'", "allowed: 'Modalities', 'Segments', 'Reference_Modality'"]),
    "task-empty": (lambda t: t.clear(), ["missing key(s) 'Modalities', 'Segments'"]),
    "task-missing-segments": (lambda t: t.pop("Segments"), ["missing key(s) 'Segments'"]),
    "modalities-not-mapping": (lambda t: t.update(Modalities=["image"]),
                               ["key 'Modalities'", "non-empty mapping", "got a list"]),
    "modalities-empty": (lambda t: t.update(Modalities={}),
                         ["key 'Modalities'", "non-empty mapping", "got an empty mapping"]),
    "modality-unknown-key": (lambda t: _mod(t).update(file_pattern="x"),
                             ["modality 'image'", "'file_pattern'", "allowed: 'File_Pattern', 'Rules_Text'"]),
    "modality-neither": (lambda t: t["Modalities"].update(image=None),
                         ["modality 'image'", "needs 'File_Pattern'", "'Rules_Text'"]),
    "modality-neither-empty-map": (lambda t: t["Modalities"].update(image={}), ["modality 'image'", "needs"]),
    "modality-key-not-string": (lambda t: t["Modalities"].update({1: {"File_Pattern": "x"}}),
                                ["key 'Modalities'", "non-empty strings", "1"]),
    "file-pattern-wrong-type": (lambda t: _mod(t).update(File_Pattern=[".nii.gz"]),
                                ["modality 'image' key 'File_Pattern'", "non-empty string", "a list"]),
    "rules-not-json": (lambda t: _mod(t).update(Rules_Text="{selections: oops"),
                       ["modality 'image' key 'Rules_Text'", "not valid JSON", '{"selections"']),
    "rules-wrong-top": (lambda t: _mod(t).update(Rules_Text=json.dumps({"selection": []})),
                        ["key 'Rules_Text'", '{"selections"', "'selection'"]),
    "rules-empty-selections": (lambda t: _mod(t).update(Rules_Text='{"selections": []}'),
                               ["key 'Rules_Text'", "non-empty list"]),
    "rules-selection-not-object": (lambda t: _mod(t).update(Rules_Text='{"selections": ["CT"]}'),
                                   ["key 'Rules_Text' selections[0]", '"conditions"']),
    "rules-selection-no-conditions": (lambda t: _mod(t).update(Rules_Text='{"selections": [{"name": "x"}]}'),
                                      ["selections[0]", '"conditions"']),
    "rules-selection-extra-key": (
        lambda t: _mod(t).update(
            Rules_Text='{"selections": [{"name": "x", "conditons": {}, "conditions": {"Modality": "CT"}}]}'),
        ["selections[0]", "'conditons'"]),
    "rules-conditions-not-mapping": (
        lambda t: _mod(t).update(Rules_Text='{"selections": [{"name": "x", "conditions": ["CT"]}]}'),
        ["selections[0]", "'conditions' must be a non-empty mapping"]),
    "rules-unknown-keyword": (
        lambda t: _mod(t).update(Rules_Text='{"selections": [{"name": "x", "conditions": {"Modalty": "CT"}}]}'),
        ["selections[0]", "'Modalty' is not a DICOM attribute keyword"]),
    "rules-bad-condition-value": (
        lambda t: _mod(t).update(Rules_Text='{"selections": [{"name": "x", "conditions": {"Modality": {"a": 1}}}]}'),
        ["condition 'Modality'", "string, a number or a non-empty list"]),
    "rules-wrong-type": (lambda t: _mod(t).update(Rules_Text=["CT"]), ["key 'Rules_Text'", "got a list"]),
    "segments-empty": (lambda t: t.update(Segments=[]), ["key 'Segments'", "non-empty list", "got an empty list"]),
    "segments-not-list": (lambda t: t.update(Segments={"Spleen": {}}), ["key 'Segments'", "got a mapping"]),
    "segment-not-mapping": (lambda t: t.update(Segments=["Spleen"]), ["Segments[0]", "expected a mapping"]),
    "segment-unknown-key": (lambda t: _seg(t).update(segment_colour=[1, 2, 3]),
                            ["Segments[0]", "'segment_colour'", "allowed:", "'recommended_display_rgb_value'"]),
    "segment-missing-key": (lambda t: _seg(t).pop("algorithm_name"),
                            ["Segments[0]", "missing key(s) 'algorithm_name'"]),
    "segment-label-number": (lambda t: _seg(t).update(segment_label=7),
                             ["Segments[0] key 'segment_label'", "non-empty string", "quote it"]),
    "segment-label-empty": (lambda t: _seg(t).update(segment_label="  "),
                            ["Segments[0] key 'segment_label'", "non-empty string"]),
    "code-missing-scheme": (lambda t: _seg(t)["segmented_property_type"].pop("scheme"),
                            ["Segments[0] key 'segmented_property_type'", "missing key(s) 'scheme'"]),
    "code-missing-meaning": (lambda t: _seg(t)["segmented_property_category"].pop("meaning"),
                             ["Segments[0] key 'segmented_property_category'", "missing key(s) 'meaning'"]),
    "code-unquoted-number": (lambda t: _seg(t)["segmented_property_type"].update(code=78961009),
                             ["key 'segmented_property_type.code'", "quote it"]),
    "code-not-mapping": (lambda t: _seg(t).update(segmented_property_type="Spleen"),
                         ["key 'segmented_property_type'", "expected a mapping with keys 'code', 'scheme', 'meaning'"]),
    "code-unknown-key": (lambda t: _seg(t).update(
        anatomic_region={"code": "1", "scheme": "SCT", "meaning": "x", "designator": "SCT"}),
        ["key 'anatomic_region'", "'designator'"]),
    "rgb-wrong": (lambda t: _seg(t).update(recommended_display_rgb_value=[255, 0]),
                  ["key 'recommended_display_rgb_value'", "three integers 0-255"]),
    "rgb-out-of-range": (lambda t: _seg(t).update(recommended_display_rgb_value=[255, 0, 256]),
                         ["key 'recommended_display_rgb_value'", "0-255"]),
    "version-number": (lambda t: _seg(t).update(algorithm_version=1.0),
                       ["key 'algorithm_version'", "quote it"]),
    "reference-unknown": (lambda t: t.update(Reference_Modality="CT"),
                          ["key 'Reference_Modality'", "'CT' is not one of the modality keys 'image'"]),
    "reference-wrong-type": (lambda t: t.update(Reference_Modality=["image"]),
                             ["key 'Reference_Modality'", "non-empty string"]),
    "duplicate-labels": (lambda t: t["Segments"].append(copy.deepcopy(t["Segments"][0])),
                         ["Segments[1] key 'segment_label'", "duplicate label 'Spleen'", "Segments[0]"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_task_level_errors_name_file_task_and_key(tmp_path, case):
    mutate, expected = CASES[case]
    message = task_error(write(tmp_path, _mutate(mutate)))
    assert "task 'Spleen'" in message, message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_task_body_not_a_mapping(tmp_path):
    message = task_error(write(tmp_path, {"tasks": {"Spleen": ["image"]}}))
    assert "task 'Spleen'" in message and "expected a mapping with keys 'Modalities'" in message


def test_keys_are_case_sensitive(tmp_path):
    doc = base_doc()
    doc["tasks"]["Spleen"]["modalities"] = doc["tasks"]["Spleen"].pop("Modalities")
    message = task_error(write(tmp_path, doc))
    assert "unknown key(s) 'modalities'" in message and "'Modalities'" in message
