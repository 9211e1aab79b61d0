"""Task <-> model agreement: modalities must be the model's inputs in order, and Segments[i-1] must exist for every
foreground label value i (and no more). These checks run on the model's embedded plans only (no network needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT

from segmap_tools.plans import make_dataset_json, make_plans
from segmap.errors import MismatchError, SegmapError
from segmap.model import default_metadata, parse_spec
from segmap.tasks import Code, Modality, Segment, SegmentationTask, load_task
from segmap.validate import check_agreement, modality_mismatch, segment_mismatch, side_by_side



def spec_for(labels, channels=("CT",), input_names=None, regions=None):
    schemes = ["CTNormalization" if c == "CT" else "ZScoreNormalization" for c in channels]
    plans = make_plans(patch_size=(16, 16, 16), spacing=(1, 1, 1), normalization_schemes=schemes, features=(4, 8))
    ds = make_dataset_json(labels, channel_names=channels, regions_class_order=regions)
    inference = {"plans": plans, "dataset_json": ds, "nnunet_configuration": "3d_fullres"}
    return parse_spec(inference, default_metadata(ds, input_names=input_names), Path("m.ts"))


def segment(label: str) -> Segment:
    return Segment(label, Code("123037004", "SCT", "Anatomical Structure"), Code("1", "SCT", label), "algo")


def task_with(modalities=("image",), segments=("Spleen",)) -> SegmentationTask:
    return SegmentationTask(
        name="Spleen", source=Path("tasks/x.yaml"),
        modalities=tuple(Modality(m, ".nii.gz", None) for m in modalities),
        segments=tuple(segment(s) for s in segments), reference_modality=modalities[0])


def mismatch(task, spec) -> str:
    with pytest.raises(MismatchError) as info:
        check_agreement(task, spec, task_source="tasks/x.yaml", model_source="m.ts")
    message = str(info.value)
    assert "\n" not in message
    assert "task 'Spleen' (tasks/x.yaml)" in message and "model (m.ts)" in message
    return message


def agrees(task, spec) -> bool:
    """Both checks find nothing (check_agreement would pass), each asserted on its own."""
    return modality_mismatch(task, spec) is None and segment_mismatch(task, spec) is None


def test_shipped_spleen_task_agrees_with_a_spleen_model():
    task = load_task(ROOT / "tasks" / "spleen.yaml")
    assert agrees(task, spec_for({"background": 0, "spleen": 1}))
    assert not agrees(task, spec_for({"background": 0, "spleen": 1, "liver": 2}))


def test_shipped_brain_tumour_task_agrees_with_a_four_channel_model():
    spec = spec_for({"background": 0, "necrosis": 1, "edema": 2, "enhancing": 3}, channels=("MR",) * 4,
                    input_names=["T1C", "T1N", "T2F", "T2W"])
    task = load_task(ROOT / "tasks" / "brain_tumour.yaml")
    assert agrees(task, spec)
    swapped = spec_for({"background": 0, "necrosis": 1, "edema": 2, "enhancing": 3}, channels=("MR",) * 4,
                       input_names=["T1N", "T1C", "T2F", "T2W"])
    assert segment_mismatch(task, swapped) is None and modality_mismatch(task, swapped) is not None


def test_more_segments_than_labels():
    message = mismatch(task_with(segments=("Spleen", "Liver")), spec_for({"background": 0, "spleen": 1}))
    assert "has 2 segments but model (m.ts) has 1 foreground label:" in message
    assert "[1: Spleen | spleen] [2: Liver | —]" in message


def test_fewer_segments_than_labels():
    spec = spec_for({"background": 0, "liver": 1, "spleen": 2, "kidney": 3})
    message = mismatch(task_with(segments=("Liver",)), spec)
    assert "has 1 segment but model (m.ts) has 3 foreground labels:" in message
    assert "[1: Liver | liver] [2: — | spleen] [3: — | kidney]" in message


def test_label_values_follow_numeric_order_not_dict_order():
    spec = spec_for({"background": 0, "kidney": 2, "liver": 1})
    message = mismatch(task_with(segments=("Liver",)), spec)
    assert "[1: Liver | liver] [2: — | kidney]" in message


def test_non_contiguous_label_values_cannot_be_described_by_position():
    message = mismatch(task_with(segments=("A", "B")), spec_for({"background": 0, "a": 1, "b": 3}))
    assert "foreground label values [1, 3], expected 1..2" in message


def test_region_based_model_counts_regions():
    spec = spec_for({"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": [3]}, regions=(1, 2, 3))
    check_agreement(task_with(segments=("Whole", "Core", "Enhancing")), spec)
    assert "has 2 segments" in mismatch(task_with(segments=("Whole", "Core")), spec)


def test_more_modalities_than_inputs():
    message = mismatch(task_with(modalities=("image", "PET")), spec_for({"background": 0, "spleen": 1}))
    assert "has 2 modalities but model (m.ts) takes 1 input:" in message
    assert "[1: image | image] [2: PET | —]" in message


def test_fewer_modalities_than_inputs():
    spec = spec_for({"background": 0, "t": 1}, channels=("MR",) * 4, input_names=["T1C", "T1N", "T2F", "T2W"])
    message = mismatch(task_with(modalities=("T1C", "T2F"), segments=("T",)), spec)
    assert "has 2 modalities but model (m.ts) takes 4 inputs:" in message
    assert "[1: T1C | T1C] [2: T2F | T1N] [3: — | T2F] [4: — | T2W]" in message


def test_modalities_in_another_order():
    spec = spec_for({"background": 0, "t": 1}, channels=("MR", "MR"), input_names=["T1", "T2"])
    message = mismatch(task_with(modalities=("T2", "T1"), segments=("T",)), spec)
    assert "another order" in message and "[1: T2 | T1] [2: T1 | T2]" in message


def test_modality_names_differ():
    spec = spec_for({"background": 0, "spleen": 1})
    message = mismatch(task_with(modalities=("CT",)), spec)
    assert "modality keys differ from the input names" in message and "[1: CT | image]" in message
    assert "model channels: CT" in message


def test_modality_names_differ_only_in_case():
    spec = spec_for({"background": 0, "t": 1}, channels=("MR", "MR"), input_names=["T1", "T2"])
    message = mismatch(task_with(modalities=("t1", "t2"), segments=("T",)), spec)
    assert "case" in message


def test_modalities_are_checked_before_segments():
    message = mismatch(task_with(modalities=("a", "b"), segments=("x", "y")), spec_for({"background": 0, "s": 1}))
    assert "modalities" in message and "segments" not in message


def test_helpers_return_none_when_things_agree():
    task, spec = task_with(), spec_for({"background": 0, "spleen": 1})
    assert modality_mismatch(task, spec) is None and segment_mismatch(task, spec) is None
    assert side_by_side(["a"], ["b", "c"]) == "[1: a | b] [2: — | c]"


def test_default_sources_name_the_task_file():
    task = task_with(segments=("A", "B"))
    with pytest.raises(SegmapError) as info:
        check_agreement(task, spec_for({"background": 0, "a": 1}))
    assert "(tasks/x.yaml)" in str(info.value) and info.value.exit_code == 2


def test_segment_names_need_not_match_label_names():
    # The task file, not the model, names segments; only positions are tied together.
    assert agrees(task_with(segments=("Milz",)), spec_for({"background": 0, "spleen": 1}))
    assert not agrees(task_with(segments=("Milz", "Leber")), spec_for({"background": 0, "spleen": 1}))
