# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Same checkpoint, same input, the same label through every door: ``monai.bundle run`` (inference.json),
``ulite-dicom``, the MONAI Label infer task and the bench's pipeline all stand on ulite_monai.bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from support.bundle import BUNDLE, REPO, blob_volume, sitk_image
from support.label import ci_requires, label_env_problem, run_label_python

from ulite_monai.bundle import Bundle

pytestmark = [pytest.mark.slow, pytest.mark.label, pytest.mark.timeout(900)]

SMALL = {"features": [8, 16, 32, 64], "roi_size": [48, 48, 48]}

LABEL_SNIPPET = r"""
import json, sys
from ulite_monai.bundle import Bundle
from ulite_monai.label.lib.infers import ULiteInfer
bundle, override, model_dir, image = sys.argv[1:5]
task = ULiteInfer(Bundle(bundle, override), model_dir)
label, result = task({"image": image, "device": "cpu"})
print(json.dumps({"label": label, "sha": result.get("checkpoint_sha256")}))
"""


def bundle_run(root, override, ckpt, image, out) -> None:
    """``python -m monai.bundle run`` of the bundle copy's inference.json + ``override`` on ``image`` (CPU)."""
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file",
         f"['{root}/configs/inference.json','{override}']", "--meta_file", f"{root}/configs/metadata.json",
         "--bundle_root", str(root), "--ckpt_path", str(ckpt), "--input", str(image),
         "--output_dir", str(out), "--device", "$torch.device('cpu')"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=out.parent, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def calibrated_checkpoint(bundle: Bundle, image: str, out) -> None:
    """Seeded weights of the bundle's network_def, the foreground bias shifted so that about half of ``image`` is
    labelled: the label has structure, so a flip, shift or resampling difference anywhere would show."""
    pipe = bundle.pipeline(random_weights=True, device="cpu", fuse=False)
    net = pipe.network
    data = pipe.preprocess(image)
    logits = pipe.predict(data["image"][None])
    last = [m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)][-1]
    with torch.no_grad():
        last.bias[1:] -= (logits[0, 1:] - logits[0, :1]).flatten(1).median(dim=1).values
    torch.save(net.state_dict(), out)


def test_every_door_gives_the_same_label(tmp_path):
    ci_requires(label_env_problem())
    root = tmp_path / "bundle"  # configs only: nothing of the working tree's models/ or eval/
    (root / "configs").mkdir(parents=True)
    for f in (BUNDLE / "configs").iterdir():
        (root / "configs" / f.name).write_bytes(f.read_bytes())
    override = tmp_path / "small.json"
    override.write_text(json.dumps(SMALL))
    inp = tmp_path / "in"
    inp.mkdir()
    image = inp / "case.nii.gz"
    sitk.WriteImage(sitk_image(blob_volume((48, 40, 36), seed=3), spacing=(2.1, 1.7, 2.6)), str(image))
    bundle = Bundle(root, [override])
    ckpt = tmp_path / "model.pt"
    calibrated_checkpoint(bundle, str(image), ckpt)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    # 1. python -m monai.bundle run (the bundle's own evaluator, fused network on the CPU)
    bundle_run(root, override, ckpt, image, tmp_path / "run")
    by_run = nib.load(str(tmp_path / "run" / "case_seg.nii.gz"))

    # 2. ulite-dicom on the same file
    batch = subprocess.run(
        [sys.executable, "-m", "ulite_monai.batch", str(inp), str(tmp_path / "batch"), "--bundle", str(root),
         "--config", str(override), "--checkpoint", str(ckpt), "--device", "cpu", "--rules", "all",
         "--no-progress"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert batch.returncode == 0, batch.stderr[-3000:]
    by_batch = nib.load(str(tmp_path / "batch" / "volumes" / "case.nii.gz"))

    # 3. the MONAI Label infer task (its own environment: monailabel, monai 1.5)
    model_dir = tmp_path / "label_model"
    model_dir.mkdir()
    (model_dir / "ulite.pt").write_bytes(ckpt.read_bytes())
    out = json.loads(run_label_python(LABEL_SNIPPET, str(root), str(override), str(model_dir), str(image))
                     .strip().splitlines()[-1])
    by_label = nib.load(out["label"])

    # 4. the bench's pipeline
    from ulite_monai.bench.quality import segment

    by_bench = segment(bundle, ckpt, str(image), device="cpu")

    ref = np.asarray(by_run.dataobj).squeeze()
    assert 0.05 < (ref > 0).mean() < 0.95, "a label with structure"
    src = nib.load(str(image))
    for name, img in (("ulite-dicom", by_batch), ("MONAI Label", by_label)):
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-4, err_msg=name)
        got = np.asarray(img.dataobj).squeeze()
        assert got.shape == ref.shape, name
        assert np.array_equal(got, ref), f"{name}: {(got != ref).sum()} voxels differ from monai.bundle run"
    assert np.array_equal(np.asarray(by_bench).squeeze(), ref), "bench pipeline differs from monai.bundle run"


def test_every_door_gives_the_same_2d_label(tmp_path):
    """The 2D bundle on a photo: monai.bundle run, the MONAI Label infer task and the bench agree pixel for pixel."""
    ci_requires(label_env_problem())
    from PIL import Image

    src = REPO / "bundles" / "ulite_2d"
    root = tmp_path / "bundle2d"
    (root / "configs").mkdir(parents=True)
    for f in (src / "configs").iterdir():
        (root / "configs" / f.name).write_bytes(f.read_bytes())
    override = tmp_path / "small.json"
    override.write_text(json.dumps({"features": [8, 16, 32, 64], "image_size": [96, 96]}))
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:120, :150]
    disc = ((yy - 50) / 30.0) ** 2 + ((xx - 90) / 40.0) ** 2 < 1
    photo = np.stack([np.where(disc, 90, 200) + rng.normal(0, 12, disc.shape)] * 3, -1).clip(0, 255).astype(np.uint8)
    image = tmp_path / "photo.png"
    Image.fromarray(photo).save(image)
    bundle = Bundle(root, [override])
    pipe = bundle.pipeline(random_weights=True, device="cpu", fuse=False, output_dir=tmp_path / "calib")
    net = pipe.network
    logits = pipe.predict(pipe.preprocess(str(image))["image"][None])
    last = [m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)][-1]
    with torch.no_grad():
        last.bias.sub_(float(logits.flatten().median()))
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    bundle_run(root, override, ckpt, image, tmp_path / "run")
    ref = np.asarray(Image.open(tmp_path / "run" / "photo_seg.png")) > 0
    assert ref.shape == (120, 150) and 0.05 < ref.mean() < 0.95
    assert (tmp_path / "run" / "photo_overlay.png").is_file()

    model_dir = tmp_path / "label_model"
    model_dir.mkdir()
    (model_dir / "ulite.pt").write_bytes(ckpt.read_bytes())
    out = json.loads(run_label_python(LABEL_SNIPPET, str(root), str(override), str(model_dir), str(image))
                     .strip().splitlines()[-1])
    assert out["label"].endswith(".png")
    by_label = np.asarray(Image.open(out["label"])) > 0
    assert by_label.shape == ref.shape and np.array_equal(by_label, ref), (by_label != ref).sum()

    from ulite_monai.bench.quality import segment

    by_bench = np.asarray(segment(bundle, ckpt, str(image), device="cpu")).squeeze()
    assert np.array_equal(by_bench.T > 0, ref), "bench pipeline differs from monai.bundle run"
