# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""DICOM discovery and series-to-volume geometry on generated series and pydicom's shipped files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from support.dicom import phantom, rotation
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from ulite_monai.io.dicom_series import SeriesRejectedError, discover_inputs, load_series_volume, sanitize_name
from support.dicom_write import write_dicom_series


def _reference_image(vol, origin, spacing, direction):
    img = sitk.GetImageFromArray(vol)
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetDirection(tuple(float(v) for v in np.asarray(direction).flatten()))
    return img


def _load_one(folder: Path):
    found = discover_inputs(folder)
    assert len(found.series) == 1, found
    return found.series[0], load_series_volume(found.series[0])


@pytest.mark.parametrize("left_handed", [False, True])
def test_oblique_series_round_trip_voxel_for_voxel(tmp_path, left_handed):
    vol = phantom((9, 14, 17), seed=1)
    direction = rotation(25, -15, 40) @ (np.diag([1, 1, -1]) if left_handed else np.eye(3))
    origin, spacing = (12.5, -40.25, 80.0), (0.7, 0.9, 2.5)
    rng = np.random.default_rng(3)
    names = [f"IMG{n:05d}" for n in rng.permutation(9)]  # file name order says nothing about z
    write_dicom_series(vol, tmp_path / "s", origin, spacing, direction, rescale=(1.0, -1024.0), file_names=names)
    # scramble InstanceNumber too: the reader must sort along the slice normal only
    for p in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = int(rng.integers(1, 100))
        ds.save_as(p)
    series, v = _load_one(tmp_path / "s")
    assert series.num_slices == 9
    assert np.isclose(np.linalg.det(v.direction), 1.0)  # always rebuilt right-handed along the normal
    assert np.allclose(v.spacing, spacing, atol=1e-5)
    if left_handed:  # the stack comes out reversed: its origin is the last written slice
        assert np.allclose(v.origin, np.asarray(origin) + 8 * 2.5 * direction[:, 2], atol=1e-4)
    else:
        assert np.allclose(v.origin, origin, atol=1e-4)
    ref = _reference_image(vol, origin, spacing, direction)
    back = sitk.Resample(v.to_sitk(), ref, sitk.Transform(), sitk.sitkNearestNeighbor, -9999)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), vol)
    assert not v.resampled


def test_rescale_slope_intercept_applied(tmp_path):
    vol = phantom((4, 6, 5)).astype(np.float64) * 0.5 - 100.25
    write_dicom_series(vol, tmp_path / "s", modality="MR", rescale=(0.25, -3000.0))
    _, v = _load_one(tmp_path / "s")
    np.testing.assert_allclose(v.array, vol, atol=1e-3)
    assert v.array.dtype == np.float32


def test_enhanced_multiframe_matches_single_frame(tmp_path):
    hd = pytest.importorskip("highdicom")
    vol = phantom((6, 10, 12), seed=4)
    direction = rotation(10, 20, -30) @ np.diag([1, 1, -1])
    paths = write_dicom_series(vol, tmp_path / "s", (1, 2, 3), (0.8, 0.8, 3.0), direction)
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=generate_uid(),
        series_number=7,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    (tmp_path / "mf").mkdir()
    mf.save_as(tmp_path / "mf" / "volume.dcm")
    series, v_mf = _load_one(tmp_path / "mf")
    assert len(series.files) == 1 and series.num_slices == 6
    assert all(f.frame_index is not None for f in v_mf.frames)
    _, v_sf = _load_one(tmp_path / "s")
    np.testing.assert_array_equal(v_mf.array, v_sf.array)
    np.testing.assert_allclose(v_mf.affine_lps, v_sf.affine_lps, atol=1e-5)


def test_discovery_groups_series_and_skips_with_reasons(tmp_path):
    root = tmp_path / "export"
    vol = phantom((5, 8, 8))
    study = generate_uid()
    a = write_dicom_series(vol, root / "mixed", study_uid=study, series_number=1)
    b = write_dicom_series(
        vol,
        root / "mixed",
        study_uid=study,
        modality="MR",
        series_number=2,
        file_names=[f"mr_{i}.dcm" for i in range(5)],
    )
    (root / "notes.txt").write_text("not dicom")
    (root / "empty.dcm").write_bytes(b"")
    raw = Path(a[0]).read_bytes()
    (root / "cut_header.dcm").write_bytes(raw[:200])  # truncated inside the header
    shutil.copy(get_testdata_file("test-SR.dcm"), root / "report.dcm")
    shutil.copy(get_testdata_file("rtstruct.dcm"), root / "rtstruct.dcm")
    shutil.copy(a[1], root / "mixed" / "copy_of_slice1.dcm")  # same SOP instance twice
    found = discover_inputs(root)
    by_modality = {s.modality: s for s in found.series}
    assert set(by_modality) == {"CT", "MR"}
    assert by_modality["CT"].num_slices == 5 and by_modality["MR"].num_slices == 5
    assert {str(p) for p in b} == set(by_modality["MR"].files)
    assert any("duplicate copy" in n for n in by_modality["CT"].notes)
    reasons = {Path(s.path).name: s.reason for s in found.skipped}
    assert "not a DICOM file" in reasons["notes.txt"]
    assert "not a DICOM file" in reasons["empty.dcm"] or "unreadable" in reasons["empty.dcm"]
    assert any(w in reasons["cut_header.dcm"] for w in ("unreadable", "truncated", "not a DICOM"))
    assert "SR" in reasons["report.dcm"] and "not a cross-sectional image" in reasons["report.dcm"]
    assert "RT Structure Set" in reasons["rtstruct.dcm"]


def test_missing_and_truncated_pixel_data_name_the_file(tmp_path):
    paths = write_dicom_series(phantom((4, 8, 8)), tmp_path / "nopix")
    ds = pydicom.dcmread(paths[2])
    del ds.PixelData
    ds.save_as(paths[2])
    with pytest.raises(SeriesRejectedError, match=r"slice_0002\.dcm: no pixel data"):
        _load_one(tmp_path / "nopix")
    paths = write_dicom_series(phantom((4, 8, 8)), tmp_path / "cut")
    raw = paths[1].read_bytes()
    paths[1].write_bytes(raw[:-50])  # pixel data cut short
    with pytest.raises(SeriesRejectedError, match=r"slice_0001\.dcm"):
        _load_one(tmp_path / "cut")


def test_uneven_spacing_resampled_and_mapped_back(tmp_path):
    vol = phantom((8, 8, 8), seed=2).astype(np.int16)
    paths = write_dicom_series(vol, tmp_path / "s", spacing=(1, 1, 2.0), direction=rotation(0, 30, 0))
    paths[3].unlink()  # a missing slice: one 4 mm gap among 2 mm gaps
    _, v = _load_one(tmp_path / "s")
    assert v.resampled and v.array.shape[0] == 8 and np.isclose(v.spacing[2], 2.0)
    assert any("uneven slice spacing" in n for n in v.notes)
    np.testing.assert_array_equal(v.frame_to_slice, [0, 1, 2, 4, 5, 6, 7])
    kept = [0, 1, 2, 4, 5, 6, 7]
    np.testing.assert_array_equal(v.array[v.frame_to_slice], vol[kept])
    np.testing.assert_allclose(v.array[3], (vol[2].astype(np.float32) + vol[4]) / 2, atol=0.51)  # interpolated


def test_geometry_rejections_state_the_reason(tmp_path):
    vol = phantom((6, 8, 8))

    # gaps too uneven: two stacks 50 mm apart
    def same():
        return {"study_uid": generate_uid(), "series_uid": generate_uid(), "frame_of_reference_uid": generate_uid()}

    uid = same()
    write_dicom_series(vol[:3], tmp_path / "far", **uid)
    write_dicom_series(vol[3:], tmp_path / "far", origin=(0, 0, 50), file_names=["x0", "x1", "x2"], **uid)
    with pytest.raises(SeriesRejectedError, match="slice gaps range"):
        _load_one(tmp_path / "far")
    # duplicate positions (two echoes in one series)
    uid = same()
    write_dicom_series(vol[:3], tmp_path / "dup", **uid)
    write_dicom_series(vol[3:], tmp_path / "dup", file_names=["e2_0", "e2_1", "e2_2"], **uid)
    with pytest.raises(SeriesRejectedError, match="share a position"):
        _load_one(tmp_path / "dup")
    # mixed orientations (a localizer inside the series)
    uid = same()
    write_dicom_series(vol[:3], tmp_path / "mixed", **uid)
    write_dicom_series(
        vol[3:], tmp_path / "mixed", direction=rotation(90, 0, 0), file_names=["loc0", "loc1", "loc2"], **uid
    )
    with pytest.raises(SeriesRejectedError, match="mixed orientations"):
        _load_one(tmp_path / "mixed")
    # gantry tilt: positions drift sideways of the normal
    paths = write_dicom_series(vol, tmp_path / "tilt", spacing=(1, 1, 2))
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [0, 0.5 * k, 2 * k]
        ds.save_as(path)
    with pytest.raises(SeriesRejectedError, match="gantry tilt"):
        _load_one(tmp_path / "tilt")


def test_pydicom_shipped_files_compressed_and_truncated(tmp_path):
    """MR_small in RLE and implicit-VR encodings gives the same volume; MR_truncated fails with its name."""
    ref = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    volumes = {}
    for name in ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"):
        src = get_testdata_file(name)
        series_uid = generate_uid()
        folder = tmp_path / sanitize_name(name)
        folder.mkdir()
        for k in range(3):  # three planes of the same image, 2 mm apart
            ds = pydicom.dcmread(src)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.ImagePositionPatient = [0, 0, 2.0 * k]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.save_as(folder / f"{k}.dcm")
        _, v = _load_one(folder)
        volumes[name] = v.array
    expected = ref.pixel_array.astype(np.float32) * float(ref.get("RescaleSlope", 1)) + float(
        ref.get("RescaleIntercept", 0)
    )
    for name, arr in volumes.items():
        assert arr.shape == (3, 64, 64), name
        np.testing.assert_array_equal(arr[1], expected, err_msg=name)
    folder = tmp_path / "trunc"
    folder.mkdir()
    shutil.copy(get_testdata_file("MR_truncated.dcm"), folder / "a.dcm")
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.SeriesInstanceUID = pydicom.dcmread(folder / "a.dcm", stop_before_pixels=True).SeriesInstanceUID
    ds.SOPInstanceUID = generate_uid()
    ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [float(ds.ImagePositionPatient[2]) + 5]
    ds.save_as(folder / "b.dcm")
    with pytest.raises(SeriesRejectedError, match=r"a\.dcm"):
        _load_one(folder)


@pytest.mark.parametrize(
    "name,plugin",
    [("MR_small_jp2klossless.dcm", "openjpeg"), ("MR_small_jpeg_ls_lossless.dcm", "jpeg_ls")],
)
def test_pydicom_shipped_compressed_through_plugins(tmp_path, name, plugin):
    """JPEG 2000 / JPEG-LS decode through pydicom's plugins (pylibjpeg-openjpeg, pyjpegls) when
    installed; without the plugin the series fails with a message naming the transfer syntax."""
    import importlib.util

    expected = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    series_uid = generate_uid()
    for k in range(2):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.ImagePositionPatient = [0, 0, 3.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.save_as(tmp_path / f"{k}.dcm")
    if importlib.util.find_spec(plugin) is not None:
        _, v = _load_one(tmp_path)
        np.testing.assert_array_equal(v.array[0], expected)
    else:
        with pytest.raises(SeriesRejectedError, match="transfer syntax"):
            _load_one(tmp_path)


def test_pydicom_ct_small_is_a_single_plane(tmp_path):
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    found = discover_inputs(tmp_path)
    assert len(found.series) == 1 and found.series[0].modality == "CT" and found.series[0].num_slices == 1
    with pytest.raises(SeriesRejectedError, match="at least 2"):
        load_series_volume(found.series[0])


def test_sanitize_name():
    assert sanitize_name("1.2.840.113619.2.55") == "1.2.840.113619.2.55"
    assert sanitize_name("../../etc/passwd") == "etc_passwd"
    assert "/" not in sanitize_name("a/b\\c d") and sanitize_name("") == "unnamed"
