"""A two-modality task (T1, T2 on different grids): one series / file per modality, T2 resampled onto the
reference grid (T1), channels stacked in the model's order, outputs on the reference grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from pydicom import dcmread

pytest.importorskip("dynamic_network_architectures")

from segmap.demo.phantom import make_phantom, write_dicom_series, write_nifti  # noqa: E402
from segmap_tools.plans import build_network, make_dataset_json, make_plans  # noqa: E402
from segmap.model import default_metadata, export_monet, load_model  # noqa: E402
from segmap.run import run  # noqa: E402
from segmap.settings import Settings  # noqa: E402
from test_app import dciodvfy_errors  # noqa: E402

RULES = '{"selections": [{"name": "%s", "conditions": {"Modality": "(?i)MR", "SeriesDescription": "(?i)%s"}}]}'


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("mm")
    torch.manual_seed(3)
    ds = make_dataset_json({"background": 0, "bright": 1, "dark": 2}, channel_names=["T1", "T2"])
    plans = make_plans(patch_size=(16, 32, 32), spacing=(4.0, 3.0, 3.0), features=(4, 8, 16),
                       normalization_schemes=["ZScoreNormalization", "ZScoreNormalization"])
    net = build_network(plans, "3d_fullres", 2, 3)
    model = export_monet(root / "model.ts", net, plans, ds, "3d_fullres",
                         metadata=default_metadata(ds, input_names=["T1", "T2"]))
    segment = {"segmented_property_category": {"code": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"},
               "segmented_property_type": {"code": "78961009", "scheme": "SCT", "meaning": "Spleen"},
               "algorithm_name": "test"}
    task = {"tasks": {"TwoMR": {
        "Modalities": {
            "T1": {"File_Pattern": "_t1.nii.gz", "Rules_Text": RULES % ("T1", "t1")},
            "T2": {"File_Pattern": "_t2.nii.gz", "Rules_Text": RULES % ("T2", "t2")},
        },
        "Reference_Modality": "T1",
        "Segments": [dict(segment, segment_label="Bright"), dict(segment, segment_label="Dark")],
    }}}
    (root / "task.yaml").write_text(yaml.safe_dump(task))
    t1 = make_phantom((20, 64, 64), (4.0, 3.0, 3.0), seed=21)
    t2 = make_phantom((16, 48, 48), (5.0, 4.0, 4.0), seed=21)  # same anatomy, coarser grid
    t1.hu[:] = np.clip(t1.hu + 1024, 0, None)
    t2.hu[:] = np.clip(2000 - (t2.hu + 1024), 0, None) * (t2.hu > -500)
    from pydicom.uid import generate_uid

    study = generate_uid()
    forum = generate_uid()
    write_dicom_series(t2, root / "dicom" / "t2", modality="MR", series_description="T2 axial", study_uid=study,
                       series_number=2, frame_of_reference_uid=forum)
    write_dicom_series(t1, root / "dicom" / "t1", modality="MR", series_description="T1 axial", study_uid=study,
                       series_number=1, frame_of_reference_uid=forum)
    write_nifti(t1, root / "nifti" / "case_t1.nii.gz")
    write_nifti(t2, root / "nifti" / "case_t2.nii.gz")
    return root, model, t1


def test_dicom_two_modalities_on_reference_grid(setup, tmp_path):
    from segmap.dicom.loading import scan_dicom_folder
    from segmap.dicom.resample import resample_to_reference
    from segmap.dicom.series_volume import series_to_volume
    from segmap.engine import EngineOptions, Segmenter
    from segmap.outputs.seg import read_seg_labels

    root, model, t1 = setup
    report = run(Settings(models=model, task_file=root / "task.yaml", input=root / "dicom", output=tmp_path,
                          input_kind="dicom", device="cpu"))
    data = json.loads(report.read_text())
    assert [i["key"] for i in data["inputs"]] == ["T1", "T2"]
    assert [i["SeriesDescription"] for i in data["inputs"]] == ["T1 axial", "T2 axial"]

    scan = scan_dicom_folder(root / "dicom")
    by_desc = {s.description: series_to_volume(s) for s in scan.series}
    ref = by_desc["T1 axial"]
    stacked = np.stack([ref.array[0].astype(np.float32),
                        resample_to_reference(by_desc["T2 axial"], ref, order=1).array[0].astype(np.float32)])
    expected = Segmenter(load_model(model), EngineOptions(device="cpu")).predict(stacked, ref.spacing_zyx)
    got = read_seg_labels(tmp_path / "segmentation.dcm", ref.meta["sop_instance_uids"])
    assert got.shape == t1.hu.shape
    assert np.array_equal(got, expected)
    assert len(np.unique(expected)) >= 2

    # The SEG names every series it was derived from: T1 (its frames' source) and T2, each with all its instances.
    seg = dcmread(tmp_path / "segmentation.dcm")
    referenced = {str(item.SeriesInstanceUID): {str(i.ReferencedSOPInstanceUID) for i in item.ReferencedInstanceSequence}
                  for item in seg.ReferencedSeriesSequence}
    t2_series = next(s for s in scan.series if s.description == "T2 axial")
    assert referenced == {ref.meta["series_instance_uid"]: set(ref.meta["sop_instance_uids"]),
                          t2_series.series_instance_uid: {d.SOPInstanceUID for d in t2_series.datasets}}
    assert dciodvfy_errors(tmp_path / "segmentation.dcm") == []


def test_nifti_two_modalities_match_dicom(setup, tmp_path):
    import nibabel as nib

    from segmap.outputs.nifti import read_label_nifti

    root, model, t1 = setup
    run(Settings(models=model, task_file=root / "task.yaml", input=root / "nifti", output=tmp_path / "n",
                 input_kind="nifti", device="cpu"))
    labels, affine = read_label_nifti(tmp_path / "n" / "segmentation.nii.gz")
    assert labels.shape == t1.hu.shape
    assert np.allclose(affine, nib.load(str(root / "nifti" / "case_t1.nii.gz")).affine, atol=1e-4)
