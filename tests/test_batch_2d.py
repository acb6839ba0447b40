# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""ulite-dicom with the 2D bundle: photos and single-frame DICOM images segmented image by image, the mask on the
image's pixel grid, an overlay, a SEG that references the DICOM image; series and cines set aside with reasons."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from support.bundle import REPO, blob_volume, sitk_image, write_dicom_series
from support.dicom import dciodvfy_errors, require_dciodvfy
from support.dicom2d import write_dicom_image

from ulite_monai.batch.runner import BatchOptions, run_batch

BUNDLE_2D = REPO / "bundles" / "ulite_2d"
# a stand-in network: foreground where the scaled image is bright; images of the model's own size (no resizing)
STANDIN = {"network_def": {"_target_": "support.bundle.MeanThreshold2D", "threshold": 0.5}, "image_size": [48, 64]}


def picture() -> np.ndarray:
    a = np.full((64, 48), 50, np.uint8)  # 64 rows, 48 columns: (x, y) = (48, 64) as MONAI reads it
    a[10:30, 20:40] = 230
    return a


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch2d")
    inp = root / "in"
    inp.mkdir()
    a = picture()
    Image.fromarray(np.stack([a] * 3, -1)).save(inp / "photo.png")
    write_dicom_image(inp / "us.dcm", a, "MONOCHROME2", "US", extra={"PixelSpacing": [0.5, 0.25]})
    write_dicom_image(inp / "derm.dcm", np.stack([a] * 3, -1), "RGB", "VL")
    write_dicom_image(inp / "cine.dcm", a, "MONOCHROME2", "US", frames=3)
    write_dicom_series(sitk_image(blob_volume((10, 30, 30))), inp / "ct")
    out = root / "out"
    opts = BatchOptions(input_dir=inp, output_dir=out, bundle_dir=BUNDLE_2D, overrides=STANDIN,
                        allow_random_weights=True, device="cpu", progress=False)
    summary = run_batch(opts)
    rows = {json.loads(line)["key"]: json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()}
    return {"in": inp, "out": out, "opts": opts, "summary": summary, "rows": rows, "expected": a > 127}


def test_images_are_segmented_one_by_one_on_their_pixel_grid(batch):
    rows, out, expected = batch["rows"], batch["out"], batch["expected"]
    done = {k: r for k, r in rows.items() if r["status"] == "done"}
    assert len(done) == 3 and batch["summary"]["counts"]["done"] == 3
    for r in done.values():
        mask = np.asarray(Image.open(out / r["outputs"]["mask"]))
        assert mask.shape == expected.shape and np.array_equal(mask > 0, expected), r["key"]
        assert np.asarray(Image.open(out / r["outputs"]["overlay"])).shape == (*expected.shape, 3)
        assert r["areas_px"] == {"lesion": int(expected.sum())}
    us = next(r for r in done.values() if r.get("modality") == "US")
    assert us["areas_mm2"] == {"lesion": round(expected.sum() * 0.5 * 0.25, 3)}  # PixelSpacing known
    photo = rows["file:photo.png"]
    assert "areas_mm2" not in photo and photo["outputs"]["mask"] == "images/photo.png"


def test_dicom_images_get_a_seg_that_references_them(batch):
    require_dciodvfy()
    rows, out, expected = batch["rows"], batch["out"], batch["expected"]
    for r in (r for r in rows.values() if r.get("kind") == "dicom2d" and r["status"] == "done"):
        seg = pydicom.dcmread(out / r["outputs"]["seg"])
        src = pydicom.dcmread(r["input"])
        ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID == r["sop_instance_uid"]
        assert seg.StudyInstanceUID == src.StudyInstanceUID and int(seg.NumberOfFrames) == 1
        assert np.array_equal(seg.pixel_array.astype(bool), expected)
        assert dciodvfy_errors(out / r["outputs"]["seg"]) == []


def test_series_and_cines_are_set_aside_with_reasons_and_reruns_resume(batch):
    rows = batch["rows"]
    skipped = [r for r in rows.values() if r["status"] == "skipped"]
    reasons = " | ".join(r["reason"] for r in skipped)
    assert len(skipped) == 2 and "3-frame" in reasons and "inference_slicewise.json" in reasons
    again = run_batch(batch["opts"])
    assert again["counts"]["already_done"] == 3 and again["counts"]["done"] == 0
