# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The 2D bundle (bundles/ulite_2d): 2D readers, training/evaluation/inference/export, slice-wise mode,
reference-code checkpoints served through the bundle."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import EnsureChannelFirst, LoadImage
from PIL import Image
from support.bundle import REPO, blob_volume, sitk_image, write_dicom_series
from support.dicom2d import palette, write_dicom_image
from support.reference_ulite import LightningLike, ReferenceULite

from ulite_monai.bundle import Bundle
from ulite_monai.io.image2d import Image2DReader

BUNDLE_2D = REPO / "bundles" / "ulite_2d"
SCHEMA = REPO / "bundles" / "ulite" / "schema" / "metadata.schema.json"
TINY = {"features": [8, 16, 32], "image_size": [64, 64], "batch_size": 4, "max_epochs": 1, "progress_bar": False}


def pattern(rows=30, cols=50) -> np.ndarray:
    """A grey 8-bit image with a bright block at rows 5..9, columns 30..44: any transpose or flip shows."""
    a = np.full((rows, cols), 40, np.uint8)
    a[5:10, 30:45] = 220
    return a


def load(path) -> np.ndarray:
    img = EnsureChannelFirst()(LoadImage(reader=Image2DReader(), image_only=True)(str(path)))
    return img


def bundle_copy(tmp_path: Path) -> Path:
    root = tmp_path / "bundle2d"
    (root / "configs").mkdir(parents=True)
    for f in (BUNDLE_2D / "configs").iterdir():
        (root / "configs" / f.name).write_bytes(f.read_bytes())
    return root


# ------------------------------------------------------------------------------------------------ readers


@pytest.mark.parametrize("kind", ["png", "jpg-rgb", "png-rgba", "tif16", "nii", "nrrd"])
def test_reader_files_keep_orientation(tmp_path, kind):
    a = pattern()
    f = tmp_path / {"png": "a.png", "jpg-rgb": "a.jpg", "png-rgba": "a.png", "tif16": "a.tif", "nii": "a.nii.gz",
                    "nrrd": "a.nrrd"}[kind]
    if kind == "png":
        Image.fromarray(a).save(f)
    elif kind == "jpg-rgb":
        Image.fromarray(np.stack([a, a, a // 2], -1)).save(f, quality=100)
    elif kind == "png-rgba":
        Image.fromarray(np.stack([a, a, a, np.full_like(a, 255)], -1)).save(f)
    elif kind == "tif16":
        Image.fromarray(a.astype(np.uint16) * 200).save(f)
    else:
        img = sitk.GetImageFromArray(a)  # (rows, columns) -> x = column
        img.SetSpacing((0.5, 0.8))
        sitk.WriteImage(img, str(f))
    x = load(f)
    assert tuple(x.shape[1:]) == (50, 30), "arrays come in (x, y) order like MONAI's other readers"
    bright = np.asarray(x[0]) > np.asarray(x[0]).mean()
    assert bright[30:45, 5:10].all() and bright.sum() == 15 * 5
    assert x.shape[0] == {"jpg-rgb": 3, "png-rgba": 4}.get(kind, 1)
    if kind in ("nii", "nrrd"):
        assert np.allclose(np.abs(np.diag(np.asarray(x.affine))[:2]), [0.5, 0.8])


@pytest.mark.parametrize(
    "photometric,kind", [("MONOCHROME2", "SC"), ("MONOCHROME1", "DX"), ("RGB", "VL"), ("YBR_FULL", "US"),
                         ("PALETTE COLOR", "US")],
)
def test_reader_dicom_images_in_display_form(tmp_path, photometric, kind):
    a = pattern()
    extra = {}
    if photometric == "MONOCHROME1":
        pixels, bits = (4095 - a.astype(np.uint16) * 16), 12  # bright block stored low: dense shows bright
        extra["ImagerPixelSpacing"] = [0.2, 0.1]
    elif photometric in ("RGB", "YBR_FULL"):
        pixels, bits = np.stack([a, a // 2, 255 - a], -1), 8
    elif photometric == "PALETTE COLOR":
        pixels, bits = a, 8
        extra.update(palette())
    else:
        pixels, bits = a, 8
        extra["PixelSpacing"] = [0.3, 0.4]
    if kind == "US":
        from pydicom.dataset import Dataset

        region = Dataset()
        region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3
        region.PhysicalDeltaX, region.PhysicalDeltaY = 0.01, 0.02  # cm per pixel
        extra["SequenceOfUltrasoundRegions"] = [region]
    f = write_dicom_image(tmp_path / "img.dcm", pixels, photometric, kind, bits, extra)
    x = np.asarray(load(f))
    assert x.shape[1:] == (50, 30)
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        assert x.shape[0] == 1
        bright = x[0] > x[0].mean()
        assert bright[30:45, 5:10].all() and bright.sum() == 75
    elif photometric == "PALETTE COLOR":
        assert x.shape[0] == 3
        assert abs(x[0, 35, 7] - 220) <= 1 and abs(x[1, 35, 7] - 35) <= 1  # red ramp, green reversed ramp
    else:
        assert x.shape[0] == 3
        assert np.abs(x[:, 35, 7] - [220, 110, 35]).max() <= 2 and np.abs(x[:, 0, 0] - [40, 20, 215]).max() <= 2
    spacing = np.diag(np.asarray(load(f).affine))[:2]
    expected = {"MONOCHROME1": [0.1, 0.2], "MONOCHROME2": [0.4, 0.3]}.get(photometric, [0.1, 0.2] if kind == "US"
                                                                           else [1.0, 1.0])
    assert np.allclose(spacing, expected)


def test_reader_refuses_multiframe_and_non_images_naming_the_file(tmp_path):
    f = write_dicom_image(tmp_path / "cine.dcm", pattern(), frames=4)
    with pytest.raises(ValueError, match=r"cine\.dcm: 4 frames"):
        load(f)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(ValueError, match="junk.dcm"):
        load(tmp_path / "junk.dcm")


# ------------------------------------------------------------------------------------------------ workflows


@pytest.mark.slow
def test_2d_bundle_trains_evaluates_infers_and_exports(tmp_path):
    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

    root = bundle_copy(tmp_path)
    b = Bundle(root, overrides=TINY)
    wf = b.workflow("train", "train")
    wf.initialize()
    wf.run()
    wf.finalize()
    assert (root / "models" / "model.pt").is_file()
    lr = wf.parser.get_parsed_content("lr_scheduler")
    assert isinstance(lr, torch.optim.lr_scheduler.ReduceLROnPlateau) and lr.mode == "max"

    ev = Bundle(root, [root / "configs" / "evaluate.json"], TINY).workflow("train", "train")
    ev.initialize()
    ev.run()
    rows = list(csv.reader(open(root / "eval" / "val_mean_dice_raw.csv")))
    assert rows[0][0] == "filename" and len(rows) > 1 and rows[1][0].endswith(".jpg")
    metrics = {r[0] for r in csv.reader(open(root / "eval" / "metrics.csv"))}
    assert metrics >= {"val_mean_dice", "val_mean_iou", "val_hd95"}

    # inference on a colour photo, a grey PNG and a DICOM image, each of its own size
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(np.stack([pattern(70, 90)] * 3, -1)).save(inputs / "photo.jpg")
    Image.fromarray(pattern(45, 33)).save(inputs / "grey.png")
    write_dicom_image(inputs / "us.dcm", pattern(40, 60), "MONOCHROME2", "US")
    out = tmp_path / "out"
    pipe = Bundle(root, overrides=TINY).pipeline(device="cpu", output_dir=out)
    for name, size in (("photo.jpg", (70, 90)), ("grey.png", (45, 33)), ("us.dcm", (40, 60))):
        pipe(str(inputs / name))
        stem = name.rsplit(".", 1)[0]
        mask = np.asarray(Image.open(out / f"{stem}_seg.png"))
        assert mask.shape == size and set(np.unique(mask)) <= {0, 255}
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        assert overlay.shape == (*size, 3)

    meta, infer = str(root / "configs" / "metadata.json"), str(root / "configs" / "inference.json")
    verify_metadata(meta_file=meta, filepath=str(SCHEMA))
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=infer, n=2, p=1, any=16,
                      bundle_root=str(root), features=[8, 16, 32])
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(root / "models" / "model.pt"), meta_file=meta,
                config_file=infer, bundle_root=str(root), features=[8, 16, 32])
    scripted = torch.jit.load(str(ts))
    assert scripted(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_slicewise_mode_puts_each_slice_back_on_the_volume_grid(tmp_path):
    """A 2D thresholding stand-in network through the slice-wise config: the label must be exactly the
    windowed volume thresholded, voxel for voxel on the input grid (NIfTI and a DICOM series folder)."""
    vol = blob_volume((12, 40, 36), seed=2)  # (z, y, x)
    img = sitk_image(vol, spacing=(1.1, 0.9, 2.5))
    f = tmp_path / "vol.nii.gz"
    sitk.WriteImage(img, str(f))
    series = write_dicom_series(img, tmp_path / "series")
    window = [-50.0, 250.0]
    over = {"network_def": {"_target_": "support.bundle.MeanThreshold2D", "threshold": 0.5}, "window": window,
            "image_size": [36, 40]}  # in-plane size of the RAS volume: no resizing
    b = Bundle(BUNDLE_2D, [BUNDLE_2D / "configs" / "inference_slicewise.json"], over)
    assert b.info().spatial_dims == 3
    pipe = b.pipeline(random_weights=True, device="cpu", output_dir=tmp_path / "out")
    for source in (f, series):
        pred = np.asarray(pipe(str(source))["pred"][0])
        ref = LoadImage(image_only=True, reader="ulite_monai.io.SITKReader")(str(source))
        expected = (np.asarray(ref) - window[0]) / (window[1] - window[0]) > 0.5
        assert pred.shape == expected.shape
        assert np.array_equal(pred > 0, expected), f"{source}: {(pred > 0 != expected).sum()} voxels differ"
    out = nib.load(str(tmp_path / "out" / "vol_seg.nii.gz"))
    assert np.allclose(out.affine, nib.load(str(f)).affine, atol=1e-4)


@pytest.mark.parametrize("layout", ["lightning", "plain"])
def test_reference_code_checkpoint_served_through_the_bundle(tmp_path, layout):
    """Train a few steps with the reference code's structure, save it the reference's way, and get the same
    predictions through the 2D bundle's pipeline (converted names, fused network)."""
    torch.manual_seed(0)
    ref = ReferenceULite()
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    x, y = torch.rand(4, 3, 64, 64), (torch.rand(4, 1, 64, 64) > 0.5).float()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(ref(x), y).backward()
        opt.step()
    ref.eval()
    ckpt = tmp_path / "ref.ckpt"
    if layout == "lightning":
        torch.save({"epoch": 0, "global_step": 3, "state_dict": LightningLike(ref).state_dict()}, ckpt)
    else:
        torch.save(ref.state_dict(), ckpt)
    image = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((80, 100, 3)) * 255).astype(np.uint8)).save(image)
    pipe = Bundle(BUNDLE_2D, overrides={"image_size": [64, 64]}).pipeline(checkpoint=ckpt, device="cpu",
                                                                           output_dir=tmp_path / "out")
    data = pipe.preprocess(str(image))
    with torch.no_grad():
        expected = ref(data["image"][None].as_tensor())
    got = pipe.predict(data["image"][None]).as_tensor()
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
    mask = np.asarray(pipe(str(image))["pred"][0])
    assert mask.shape == (100, 80)  # the input's grid, (x, y)
