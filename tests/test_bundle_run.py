# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The bundle's workflows on tiny budgets: training (+ resume), evaluation CSVs, inference written back onto
the input grid (NIfTI, NRRD, DICOM series), and errors on bad data. The 2D bundle: test_bundle_2d.py."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.transforms import LoadImage

from support.bundle import CONFIGS, blob_volume, sitk_image, write_dicom_series
from ulite_monai.data.demo import generate_demo_dataset
from ulite_monai.io import SITKReader

META = str(CONFIGS / "metadata.json")
LOGGING = str(CONFIGS / "logging.conf")
TRAIN = str(CONFIGS / "train.json")
EVAL = str(CONFIGS / "evaluate.json")
INFER = str(CONFIGS / "inference.json")

# tiny budget: 4 mm voxels, 3-stage network, one 32^3 patch per volume
TINY = {
    "pixdim": [4.0, 4.0, 4.0],
    "features": [4, 8, 16],
    "patch_size": [32, 32, 32],
    "roi_size": [32, 32, 32],
    "num_samples": 1,
    "batch_size": 2,
    "max_epochs": 1,
    "val_interval": 1,
    "progress_bar": False,
}


def _workflow(config, workflow_type, **overrides):
    wf = ConfigWorkflow(config_file=config, meta_file=META, logging_file=LOGGING, workflow_type=workflow_type,
                        **overrides)
    wf.initialize()
    return wf


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo3d")
    generate_demo_dataset(root, num_train=2, num_val=1, num_test=1)
    return root


@pytest.fixture(scope="module")
def trained(demo_dir, tmp_path_factory):
    """One tiny training epoch; returns the overrides that point at its outputs."""
    out = tmp_path_factory.mktemp("train_out")
    ov = dict(TINY, dataset_dir=str(demo_dir), ckpt_dir=str(out / "models"), log_dir=str(out / "runs"),
              output_dir=str(out / "eval"))
    wf = _workflow(TRAIN, "train", **ov)
    wf.run()
    wf.finalize()
    return ov, wf


def test_training_saves_best_and_last(trained):
    ov, wf = trained
    models = Path(ov["ckpt_dir"])
    best = models / "model.pt"
    assert best.is_file()
    state = torch.load(best, map_location="cpu", weights_only=True)
    net = wf.parser.get_parsed_content("network_def")
    net.load_state_dict(state)  # keys and shapes match the config's network
    last = list(models.glob("last_checkpoint_epoch=*.pt"))
    assert len(last) == 1
    full = torch.load(last[0], map_location="cpu", weights_only=True)
    assert set(full) >= {"model", "optimizer", "lr_scheduler", "trainer"}
    assert 0.0 <= wf.parser.get_parsed_content("validate#evaluator").state.best_metric <= 1.0
    assert any(Path(ov["log_dir"]).glob("events.out.tfevents.*"))


def test_resume_continues_from_checkpoint(trained, tmp_path):
    ov, _ = trained
    last = next(Path(ov["ckpt_dir"]).glob("last_checkpoint_epoch=*.pt"))
    ov2 = dict(ov, max_epochs=2, resume_ckpt=str(last), ckpt_dir=str(tmp_path / "models"))
    wf = _workflow(TRAIN, "train", **ov2)
    started = []
    trainer = wf.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append(e.state.epoch))
    wf.run()
    assert started == [2]  # epoch 1 came from the checkpoint
    assert trainer.state.epoch == 2


def test_evaluate_writes_metric_csvs(trained, tmp_path):
    """evaluate.json with a known model (HU threshold): per-case Dice/IoU/HD95/MSD CSVs plus summaries."""
    ov, _ = trained
    (tmp_path / "models").mkdir()
    _threshold_checkpoint(tmp_path / "models" / "model.pt", hu_threshold=90.0)
    ov2 = dict(ov, output_dir=str(tmp_path / "eval"), ckpt_dir=str(tmp_path / "models"),
               network_def={"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1})
    wf = _workflow([TRAIN, EVAL], "infer", **ov2)
    wf.run()
    out = Path(ov2["output_dir"])
    per_case = {}
    for name in ("val_mean_dice", "val_mean_iou", "val_hd95", "val_msd"):
        rows = list(csv.reader(open(out / f"{name}_raw.csv")))
        assert rows[0][0] == "filename" and len(rows) == 2  # header + the one validation case
        assert rows[1][0].endswith("case_002.nii.gz")
        per_case[name] = float(rows[1][1])
        assert (out / f"{name}_summary.csv").is_file()
    assert {r[0] for r in csv.reader(open(out / "metrics.csv"))} >= {"val_mean_dice", "val_hd95"}
    dice, iou = per_case["val_mean_dice"], per_case["val_mean_iou"]
    assert dice > 0.5  # a threshold finds most of the (bright) target
    assert iou == pytest.approx(dice / (2 - dice), abs=1e-4)  # IoU and Dice of the same masks
    assert 0.0 < per_case["val_msd"] <= per_case["val_hd95"] < 100.0  # millimetres, finite


def _threshold_checkpoint(path: Path, hu_threshold: float, intensity_range=(-200.0, 300.0)) -> Path:
    """Weights of a 1x1x1 Conv3d whose argmax is ``HU > hu_threshold`` after the bundle's intensity scaling."""
    t = (hu_threshold - intensity_range[0]) / (intensity_range[1] - intensity_range[0])
    k = 50.0
    state = {"weight": torch.tensor([0.0, k]).reshape(2, 1, 1, 1, 1), "bias": torch.tensor([0.0, -k * t])}
    torch.save(state, path)
    return path


def test_inference_overlays_input_voxel_for_voxel(tmp_path):
    """Output labels sit on the input grid (shape, RAS affine) and match a known answer voxel for voxel."""
    arr = blob_volume(shape=(24, 40, 36), seed=2)  # (z, y, x)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    sitk.WriteImage(sitk_image(arr, spacing=(1.3, 1.1, 2.2)), str(inputs / "oblique.nii.gz"))
    sitk.WriteImage(sitk_image(arr, spacing=(1.0, 1.2, 1.9), left_handed=True), str(inputs / "lefthanded.nrrd"))
    dicom = write_dicom_series(sitk_image(arr, spacing=(1.2, 1.2, 2.0), left_handed=True), tmp_path / "dicom_series")
    ckpt = _threshold_checkpoint(tmp_path / "model.pt", hu_threshold=100.0)
    ov = {
        "input": [str(inputs), str(dicom)],
        "output_dir": str(tmp_path / "out"),
        "ckpt_path": str(ckpt),
        "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1},
        "pixdim": [1.6, 1.6, 1.6],
        "roi_size": [32, 32, 32],
        "keep_largest_component": False,  # the expected mask has two parts (blob + bar)
    }
    wf = _workflow(INFER, "infer", **ov)
    wf.run()
    loader = LoadImage(reader=SITKReader(), image_only=True)
    for src, name in [(inputs / "oblique.nii.gz", "oblique_seg.nii.gz"), (inputs / "lefthanded.nrrd", "lefthanded_seg.nii.gz"),
                      (dicom, "dicom_series_seg.nii.gz")]:
        ref = loader(str(src))
        out = nib.load(str(tmp_path / "out" / name))
        np.testing.assert_allclose(out.affine, ref.affine.numpy(), atol=1e-3)
        seg = np.asarray(out.dataobj)
        assert seg.shape == tuple(ref.shape) and seg.dtype == np.uint8
        expected = ref.numpy() > 100.0
        dice = 2 * np.logical_and(seg > 0, expected).sum() / ((seg > 0).sum() + expected.sum())
        assert dice > 0.9, (name, dice)
        flipped = expected[::-1]
        dice_flipped = 2 * np.logical_and(seg > 0, flipped).sum() / ((seg > 0).sum() + flipped.sum())
        assert dice_flipped < 0.6  # the check can tell a mirrored overlay apart


def test_inference_missing_checkpoint_says_what_to_do(tmp_path):
    img = tmp_path / "a.nii.gz"
    sitk.WriteImage(sitk_image(blob_volume(shape=(8, 8, 8))), str(img))
    with pytest.raises(Exception) as e:
        wf = _workflow(INFER, "infer", input=str(img), output_dir=str(tmp_path / "o"), ckpt_path=str(tmp_path / "no.pt"))
        wf.run()
    assert "checkpoint not found" in _chain(e.value) and "no.pt" in _chain(e.value)
    assert "Train first" in _chain(e.value)


def _chain(exc: BaseException) -> str:
    """All messages of an exception and its causes (MONAI wraps errors raised inside config expressions)."""
    msgs = []
    while exc is not None:
        msgs.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return " | ".join(msgs)


# --- bad data: the error names the file ------------------------------------------------------------------


def _val_preprocessing(dataset_dir):
    wf = ConfigWorkflow(config_file=TRAIN, meta_file=META, workflow_type=None, dataset_dir=str(dataset_dir), demo_data=None)
    return wf.parser.get_parsed_content("validate#preprocessing")


def _write_pair(folder: Path, image: np.ndarray, label: np.ndarray, name="bad", is_vector=False):
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(image, isVector=is_vector)
    sitk.WriteImage(img, str(folder / "imagesTr" / f"{name}.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(label), str(folder / "labelsTr" / f"{name}.nii.gz"))
    return {"image": str(folder / "imagesTr" / f"{name}.nii.gz"), "label": str(folder / "labelsTr" / f"{name}.nii.gz")}


def test_missing_dataset_folder_is_named(tmp_path):
    from ulite_monai.data import load_datalist

    with pytest.raises(FileNotFoundError, match="no_such_data"):
        load_datalist(tmp_path / "no_such_data", "training", demo=None)


def test_bad_data_errors_name_the_file(tmp_path):
    pre = _val_preprocessing(tmp_path)
    img = blob_volume(shape=(16, 16, 16)).astype(np.int16)
    ok_label = np.zeros((16, 16, 16), np.uint8)
    # label values out of range
    item = _write_pair(tmp_path, img, (ok_label + 3).astype(np.uint8), name="label_out_of_range")
    with pytest.raises(Exception) as e:
        pre(item)
    assert "label_out_of_range.nii.gz" in _chain(e.value) and "outside 0..1" in _chain(e.value)
    # wrong channel count (2-component image)
    item = _write_pair(tmp_path, np.stack([img, img], -1), ok_label, name="two_channels", is_vector=True)
    with pytest.raises(Exception) as e:
        pre(item)
    assert "two_channels.nii.gz" in _chain(e.value) and "expected 1 channel" in _chain(e.value)
    # unreadable file
    broken = tmp_path / "imagesTr" / "corrupt.nii.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(Exception) as e:
        pre({"image": str(broken), "label": item["label"]})
    assert "corrupt.nii.gz" in _chain(e.value)
    # a datalist entry that does not exist
    (tmp_path / "datalist.json").write_text('{"training": [{"image": "imagesTr/gone.nii.gz", "label": "x.nii.gz"}]}')
    from ulite_monai.data import load_datalist

    with pytest.raises(FileNotFoundError, match="gone.nii.gz"):
        load_datalist(tmp_path, "training")
