# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""RTSTRUCT, SR volume report, LABELMAP SEG and the QC preview/flag, on generated series."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from support.dicom import dciodvfy_errors, make_standin_bundle, phantom, read_manifest, require_dciodvfy, rotation
from support.dicom_write import write_dicom_series
from test_batch_cli import run_main

from ulite_monai.batch.qc import ReviewRules, confidence, foreground_centre, review_reasons
from ulite_monai.io.dicom_seg import build_dicom_seg, segments_from_channel_def
from ulite_monai.io.dicom_series import discover_inputs, load_series_volume
from ulite_monai.io.rtstruct import build_rtstruct, rtstruct_to_labels, source_plane_labels
from ulite_monai.io.sr import build_volume_report

SEGMENTS = segments_from_channel_def({"0": "background", "1": "liver", "2": "spleen", "3": "lesion"})


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """An oblique, left-handed CT with non-square pixels and a missing slice (resampled), and a 3-class label."""
    root = tmp_path_factory.mktemp("outputs")
    vol = phantom((14, 40, 36), seed=8, radius=7)
    direction = rotation(12, -20, 35) @ np.diag([1, 1, -1])
    paths = write_dicom_series(vol, root / "ct", (5, -3, 40), (0.7, 0.9, 2.5), direction, rescale=(1.0, -1024.0))
    paths[6].unlink()  # uneven gaps: the SEG/RTSTRUCT still map to every source plane
    (s,) = discover_inputs(root / "ct").series
    v = load_series_volume(s)
    rng = np.random.default_rng(0)
    labels = np.zeros(v.array.shape, np.uint8)
    labels[v.array > 0] = 1
    labels[:, 3:12, 4:14] = 2
    labels[(rng.random(v.array.shape) < 0.02) & (labels == 0)] = 3  # speckle: many tiny contours
    labels[5, 20:30, 20:30] = 2
    labels[5, 23:27, 23:27] = 0  # a hole
    return root, v, labels


def test_rtstruct_reads_back_onto_the_source_grid(series):
    require_dciodvfy()
    root, v, labels = series
    assert v.resampled
    ds = build_rtstruct(labels, v, SEGMENTS, "ulite-test", "1.0")
    path = root / "rt.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    back = rtstruct_to_labels(pydicom.dcmread(path), v)
    ref = source_plane_labels(labels, v)
    for s in SEGMENTS:
        a, b = back == s.number, ref == s.number
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice >= 0.98, (s.label, dice)
    np.testing.assert_array_equal(back, ref)  # level-0.5 outlines + even-odd fill: exact here
    refs = {c.ContourImageSequence[0].ReferencedSOPInstanceUID
            for r in ds.ROIContourSequence for c in r.ContourSequence}
    assert refs <= set(v.datasets)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["liver", "spleen", "lesion"]


def test_sr_volume_report_references_seg_segments(series):
    require_dciodvfy()
    root, v, labels = series
    seg = build_dicom_seg(labels, v, SEGMENTS, "ulite-test", "1.0")
    sr = build_volume_report(seg, labels, v, SEGMENTS, "ulite-test", "1.0")
    path = root / "sr.dcm"
    sr.save_as(path)
    assert dciodvfy_errors(path) == []
    import highdicom as hd

    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    assert len(report.content.get_volumetric_roi_measurement_groups()) == len(SEGMENTS)
    ds = pydicom.dcmread(path)
    text = str(ds)
    assert "1500" in str(ds.ContentTemplateSequence[0].TemplateIdentifier)
    assert seg.SOPInstanceUID in text and str(v.datasets[v.frames[0].sop_instance_uid].SeriesInstanceUID) in text
    voxel_ml = np.prod(v.spacing) / 1000
    for s in SEGMENTS:
        mask = labels == s.number
        assert f"{round(mask.sum() * voxel_ml, 4)}" in text
        assert f"{round(float(v.array[mask].mean()), 4)}" in text  # mean HU inside the segment


def test_labelmap_seg_is_more_compact_than_binary(series):
    root, v, labels = series
    binary = build_dicom_seg(labels, v, SEGMENTS, "ulite-test", "1.0")
    labelmap = build_dicom_seg(labels, v, SEGMENTS, "ulite-test", "1.0", seg_type="labelmap")
    assert labelmap.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
    planes_with_label = int(np.sum(source_plane_labels(labels, v).reshape(len(v.frames), -1).any(axis=1)))
    assert int(labelmap.NumberOfFrames) == planes_with_label
    assert int(binary.NumberOfFrames) > 2 * int(labelmap.NumberOfFrames)
    labelmap.save_as(root / "lm.dcm")
    back = pydicom.dcmread(root / "lm.dcm")
    assert back.pixel_array.max() == len(SEGMENTS)  # one frame carries every label value


def test_review_rules():
    import torch

    sure = torch.zeros(1, 2, 4, 4, 4)
    sure[:, 1, :2] = 10.0
    conf = confidence(sure)
    assert conf["mean_fg_probability"] > 0.99 and conf["mean_fg_entropy"] < 0.01
    unsure = torch.zeros(1, 2, 4, 4, 4)
    unsure[:, 1, :2] = 0.2
    low = confidence(unsure)
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[:2] = 1
    rules = ReviewRules()
    assert review_reasons(labels, [1], conf, False, rules) == []
    assert any("low confidence" in r for r in review_reasons(labels, [1], low, False, rules))
    assert review_reasons(np.zeros_like(labels), [1], conf, False, rules) == ["empty: no voxel segmented"]
    assert "implausibly large" in review_reasons(np.ones_like(labels), [1], conf, False, rules)[0]
    assert "resampled" in review_reasons(labels, [1], conf, True, rules)[0]


def test_batch_writes_every_output_and_flags_review(tmp_path, capsys):
    from PIL import Image

    require_dciodvfy()
    inp = tmp_path / "in"
    write_dicom_series(phantom((10, 24, 24), seed=3), inp / "ok")
    paths = write_dicom_series(phantom((10, 24, 24), seed=4), inp / "gappy")
    paths[4].unlink()
    bundle = make_standin_bundle(tmp_path / "bundle")
    rc, _, err = run_main([inp, tmp_path / "out", "--bundle", bundle, "--random-weights", "--no-progress",
                           "--rules", "all", "--formats", "seg,nifti,rtstruct,sr,qc"], capsys)
    assert rc == 0, err[-2000:]
    rows = {r["input"].rsplit("/", 1)[-1]: r for r in read_manifest(tmp_path / "out").values()}
    for name, row in rows.items():
        assert set(row["outputs"]) == {"seg", "nifti", "rtstruct", "sr", "qc"}
        assert row["seg_type"] == "binary" and row["seg_frames"] == int(pydicom.dcmread(
            tmp_path / "out" / row["outputs"]["seg"], stop_before_pixels=True).NumberOfFrames)
        for kind in ("rtstruct", "sr"):
            assert dciodvfy_errors(tmp_path / "out" / row["outputs"][kind]) == [], (name, kind)
        png = Image.open(tmp_path / "out" / row["outputs"]["qc"])
        assert png.format == "PNG" and png.size[0] > png.size[1] > 100
        pix = np.asarray(png.convert("RGB"))
        assert np.any((pix[..., 0] > 200) & (pix[..., 1] < 100))  # the red outline is drawn
        assert row["confidence"]["mean_fg_probability"] is not None
    assert rows["ok"]["needs_review"] is False and rows["ok"]["review_reasons"] == []
    assert rows["gappy"]["needs_review"] is True and "resampled" in rows["gappy"]["review_reasons"][0]


def test_preview_centre_equals_the_centroid_of_the_labelled_voxels():
    """The QC preview's planes go through the labels' centroid; counted per axis it must equal the mean of the
    labelled voxels' indices (what ``np.argwhere`` gave, at 16 times the time for large labels)."""
    rng = np.random.default_rng(3)
    for shape, p in [((9, 40, 30), 0.5), ((1, 64, 48), 0.02), ((48, 128, 96), 0.65), ((5, 7, 11), 0.0)]:
        labels = (rng.random(shape) < p).astype(np.uint8) * rng.integers(1, 3, size=shape).astype(np.uint8)
        fg = np.argwhere(labels > 0)
        want = (fg.mean(axis=0) if len(fg) else np.asarray(shape) / 2).astype(int)
        assert foreground_centre(labels) == tuple(int(v) for v in want)
    one = np.zeros((6, 6, 6), np.uint8)
    one[5, 0, 3] = 2
    assert foreground_centre(one) == (5, 0, 3)
