# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""SITKReader: geometry (RAS affine) and voxel order for NIfTI, NRRD, MHA and DICOM series folders."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from monai.transforms import LoadImage

from support.bundle import blob_volume, sitk_image, write_dicom_series
from ulite_monai.io import SITKReader


def _expected_ras_affine(img) -> np.ndarray:
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    a = np.eye(4)
    a[:3, :3] = d @ np.diag(img.GetSpacing())
    a[:3, 3] = img.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ a  # LPS -> RAS


def _world_of_voxel(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.append(np.asarray(ijk, dtype=float), 1.0))[:3]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_file_formats_geometry(tmp_path, suffix):
    arr = blob_volume()
    img = sitk_image(arr, left_handed=suffix == ".nrrd")
    path = tmp_path / f"vol{suffix}"
    sitk.WriteImage(img, str(path))
    out = LoadImage(reader=SITKReader(), image_only=True)(str(path))
    # (x, y, z) order, same voxels as the (z, y, x) numpy array
    np.testing.assert_array_equal(out.numpy(), arr.transpose(2, 1, 0).astype(np.float32))
    np.testing.assert_allclose(out.affine.numpy(), _expected_ras_affine(img), atol=1e-4)
    # a voxel maps to the same physical point SimpleITK reports (LPS -> RAS flips x, y)
    ijk = (5, 7, 3)
    lps = np.asarray(img.TransformIndexToPhysicalPoint(ijk))
    np.testing.assert_allclose(_world_of_voxel(out.affine.numpy(), ijk), lps * [-1, -1, 1], atol=1e-3)


def test_nifti_matches_nibabel_reader(tmp_path):
    arr = blob_volume(seed=3)
    path = tmp_path / "vol.nii.gz"
    sitk.WriteImage(sitk_image(arr), str(path))
    a = LoadImage(reader=SITKReader(), image_only=True)(str(path))
    b = LoadImage(reader="NibabelReader", image_only=True)(str(path))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-4)


@pytest.mark.parametrize("left_handed", [False, True])
def test_dicom_series_same_voxels_in_physical_space(tmp_path, left_handed):
    arr = blob_volume(shape=(12, 20, 18), seed=1)
    img = sitk_image(arr, left_handed=left_handed)
    folder = write_dicom_series(img, tmp_path / "series")
    out = LoadImage(reader=SITKReader(), image_only=True)(str(folder))
    ref_aff = _expected_ras_affine(img)
    got_aff = out.affine.numpy()
    data = out.numpy()
    assert data.shape == tuple(reversed(arr.shape))
    # every voxel of the reference lands on a voxel of the DICOM read-back with the same value
    inv = np.linalg.inv(got_aff)
    for ijk in [(0, 0, 0), (17, 19, 11), (5, 12, 3), (9, 2, 8)]:
        world = _world_of_voxel(ref_aff, ijk)
        idx = np.rint(inv @ np.append(world, 1.0))[:3].astype(int)
        assert data[tuple(idx)] == arr[ijk[2], ijk[1], ijk[0]]
    if not left_handed:
        np.testing.assert_allclose(got_aff, ref_aff, atol=1e-3)


def test_dicom_folder_with_two_series_needs_a_choice(tmp_path):
    img = sitk_image(blob_volume(shape=(4, 8, 8)))
    write_dicom_series(img, tmp_path / "mixed", series_uid="1.2.826.0.1.3680043.8.498.111")
    write_dicom_series(img, tmp_path / "mixed", series_uid="1.2.826.0.1.3680043.8.498.222")
    with pytest.raises(ValueError, match="2 DICOM series"):
        LoadImage(reader=SITKReader(), image_only=True)(str(tmp_path / "mixed"))
    out = LoadImage(reader=SITKReader(series_uid="1.2.826.0.1.3680043.8.498.222"), image_only=True)(
        str(tmp_path / "mixed")
    )
    assert out.shape == (8, 8, 4)


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(Exception, match="broken.nii.gz"):
        LoadImage(reader=SITKReader(), image_only=True)(str(bad))
    with pytest.raises(Exception, match="missing.nrrd"):
        LoadImage(reader=SITKReader(), image_only=True)(str(tmp_path / "missing.nrrd"))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(Exception, match="no DICOM series"):
        LoadImage(reader=SITKReader(), image_only=True)(str(empty))


def test_rgb_image_channel_last(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, size=(10, 12, 3), dtype=np.uint8)
    img = sitk.GetImageFromArray(rgb, isVector=True)
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(img, str(path))
    out = LoadImage(reader=SITKReader(), image_only=True, ensure_channel_first=True)(str(path))
    assert out.shape == (3, 12, 10)
    np.testing.assert_array_equal(out[1].numpy(), rgb[..., 1].T)
