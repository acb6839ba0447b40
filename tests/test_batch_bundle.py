# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The batch CLI on the real ulite bundle (bundles/ulite/configs/inference.json), CPU, small series.

The checkpoint is made here from the bundle's own ``network_def`` with the output bias pushed to
"foreground": every voxel the bundle's preprocessing keeps (CropForegroundd) becomes foreground,
and Invertd must bring that box back onto the source grid. The SEG frames are then checked
against the NIfTI label at every source plane, both produced through the bundle pipeline.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from support.dicom import (
    REAL_BUNDLE,
    dciodvfy_errors,
    phantom,
    read_manifest,
    require_dciodvfy,
    rotation,
    seg_frames_by_source,
)
from test_batch_cli import run_main

from support.phantoms import foreground_probe_checkpoint
from support.dicom_write import write_dicom_series


@pytest.mark.slow
def test_real_bundle_seg_matches_nifti_at_every_source_plane(tmp_path, capsys):
    require_dciodvfy()
    assert (REAL_BUNDLE / "configs" / "inference.json").is_file()
    ct = phantom((24, 40, 44), seed=21, radius=7)
    geo = {
        "origin": (-20.0, 35.0, -110.0),
        "spacing": (1.6, 1.4, 3.0),
        "direction": rotation(8, -14, 21) @ np.diag([1, 1, -1]),
    }
    paths = write_dicom_series(ct, tmp_path / "in" / "ct", rescale=(1.0, -1024.0), **geo)
    ckpt = tmp_path / "fg.pt"
    foreground_probe_checkpoint(REAL_BUNDLE, ckpt)
    out = tmp_path / "out"
    rc, stdout, err = run_main(
        [tmp_path / "in", out, "--bundle", REAL_BUNDLE, "--checkpoint", ckpt, "--device", "cpu", "--no-progress"],
        capsys,
    )
    assert rc == 0, err[-3000:]
    (row,) = [r for r in read_manifest(out).values() if r["kind"] == "dicom"]
    assert row["status"] == "done" and row["model_version"].startswith("U-Lite segmentation 0.1.0 sha256:")
    seg_path = out / row["outputs"]["seg"]
    assert dciodvfy_errors(seg_path) == []
    label = sitk.ReadImage(str(out / row["outputs"]["nifti"]))
    ref = sitk.GetImageFromArray(ct)
    ref.SetOrigin(geo["origin"])
    ref.SetSpacing(geo["spacing"])
    ref.SetDirection(tuple(geo["direction"].flatten()))
    on_source = sitk.GetArrayFromImage(sitk.Resample(label, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 255))
    assert 0 < on_source.sum() < on_source.size  # the foreground box, not everything
    frames = seg_frames_by_source(seg_path)
    seg = pydicom.dcmread(seg_path)
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(paths)
    for k, p in enumerate(paths):
        uid = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        mask = frames[uid][0] if uid in frames else np.zeros(ct.shape[1:], np.uint8)
        np.testing.assert_array_equal(mask, on_source[k], err_msg=f"plane {k}")
    voxel_ml = np.prod(geo["spacing"]) / 1000
    assert row["volumes_ml"]["foreground"] == pytest.approx(on_source.sum() * voxel_ml, rel=1e-3)
