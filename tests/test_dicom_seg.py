# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""DICOM SEG writing: references, geometry, codes, dciodvfy, empty predictions."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from support.dicom import dciodvfy_errors, phantom, require_dciodvfy, rotation, seg_frames_by_source

from ulite_monai.io.dicom_seg import segments_from_channel_def, write_dicom_seg
from ulite_monai.io.dicom_series import discover_inputs, load_series_volume
from support.dicom_write import write_dicom_series


def test_segments_from_channel_def_codes():
    segs = segments_from_channel_def({"0": "background", "1": "spleen", "2": "lesion", "3": "my structure"})
    assert [s.number for s in segs] == [1, 2, 3]
    assert segs[0].type == ("78961009", "SCT", "Spleen") and segs[0].category[2] == "Anatomical Structure"
    assert segs[1].category[2] == "Morphologically Abnormal Structure"
    assert segs[2].label == "my structure" and segs[2].type[2] == "Tissue"
    explicit = segments_from_channel_def(
        {
            "1": {
                "label": "tumour",
                "type": ["108369006", "SCT", "Neoplasm"],
                "category": ["49755003", "SCT", "Morphologically Abnormal Structure"],
            }
        }
    )
    assert explicit[0].type == ("108369006", "SCT", "Neoplasm")
    assert [s.label for s in segments_from_channel_def({}, num_labels=2)] == ["label 1", "label 2"]
    with pytest.raises(ValueError, match="code"):
        segments_from_channel_def({"1": {"label": "x", "type": ["1", "SCT"]}})


def test_seg_references_every_instance_and_matches_positions(tmp_path):
    require_dciodvfy()
    vol = phantom((8, 16, 18), seed=5)
    direction = rotation(15, 25, -20) @ np.diag([1, 1, -1])
    paths = write_dicom_series(vol, tmp_path / "src", (5, 6, 7), (0.6, 0.7, 3.0), direction, rescale=(1, -1024))
    series = discover_inputs(tmp_path / "src").series[0]
    v = load_series_volume(series)
    labels = np.zeros(v.array.shape, np.uint8)
    labels[v.array > 0] = 1
    labels[(v.array < -530)] = 2  # a second label on scattered background voxels
    segs = segments_from_channel_def({"0": "background", "1": "liver", "2": "lesion"})
    out = write_dicom_seg(labels, v, segs, tmp_path / "out" / "x.seg.dcm", "ulite", "1.2.3")
    assert out is not None and out.exists() and not list((tmp_path / "out").glob(".tmp-*"))
    assert dciodvfy_errors(out) == []
    seg = pydicom.dcmread(out)
    src = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): (k, p) for k, p in enumerate(paths)}
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(src)
    assert seg.FrameOfReferenceUID == pydicom.dcmread(paths[0]).FrameOfReferenceUID
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lesion"
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "ulite" and algo.AlgorithmVersion == "1.2.3"
    frames = seg_frames_by_source(out)
    for uid, (mask, pos) in frames.items():
        k, p = src[uid]
        ipp = [float(x) for x in pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient]
        np.testing.assert_allclose(pos, ipp, atol=1e-4)
        expected = np.where(vol[k] > 0, 1, np.where(vol[k] < -530, 2, 0))
        np.testing.assert_array_equal(mask, expected)


def test_empty_prediction_writes_nothing(tmp_path):
    write_dicom_series(phantom((3, 8, 8)), tmp_path / "src")
    v = load_series_volume(discover_inputs(tmp_path / "src").series[0])
    segs = segments_from_channel_def({"1": "spleen"})
    assert write_dicom_seg(np.zeros(v.array.shape, np.uint8), v, segs, tmp_path / "o.dcm", "a", "1") is None
    assert not (tmp_path / "o.dcm").exists()
    with pytest.raises(ValueError, match="does not match"):
        write_dicom_seg(np.zeros((1, 2, 3), np.uint8), v, segs, tmp_path / "o.dcm", "a", "1")


def test_resampled_series_seg_has_one_frame_per_source_plane(tmp_path):
    vol = phantom((7, 10, 10), seed=8)
    paths = write_dicom_series(vol, tmp_path / "src", spacing=(1, 1, 2.0), rescale=(1, -1024))
    paths[2].unlink()  # missing slice -> resampled grid
    v = load_series_volume(discover_inputs(tmp_path / "src").series[0])
    assert v.resampled
    labels = (v.array > 0).astype(np.uint8)
    labels[2] = 1  # the interpolated slice: must not leak into any source frame
    out = write_dicom_seg(labels, v, segments_from_channel_def({"1": "liver"}), tmp_path / "s.dcm", "a", "1")
    frames = seg_frames_by_source(out)
    for k, p in enumerate(paths):
        if k == 2:
            continue
        uid = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        mask = frames[uid][0] if uid in frames else np.zeros((10, 10), np.uint8)
        np.testing.assert_array_equal(mask, (vol[k] > 0).astype(np.uint8))
    assert len(pydicom.dcmread(out).ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 6
