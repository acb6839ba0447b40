# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The benchmark's device, AMP, bundle and training-step options, checked on the CPU (tiny sizes).

The CUDA paths share these code paths (device resolution, autocast and GradScaler steps, report rendering);
``tests/test_bench_cuda.py`` runs them on a GPU where there is one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ulite_monai.bench import cli, device as D, report
from ulite_monai.bench.models import build_model
from ulite_monai.bench.workloads import make_labels, make_step
from ulite_monai.networks import ULite

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "ulite"


def test_bench_reads_bundles_only_through_the_bundle_layer():
    """Issue 11: no ConfigParser/ConfigWorkflow and no checkpoint reading in the bench."""
    offenders = []
    for f in sorted((REPO / "ulite_monai" / "bench").rglob("*.py")):
        text = f.read_text()
        for pattern in (r"ConfigParser\(", r"ConfigWorkflow\(", r"torch\.load\(", r"bundle_utils",
                        r"DEFAULT_BUNDLE_(INFERENCE|TRAIN)", r"_FALLBACK"):
            if re.search(pattern, text):
                offenders.append(f"{f.name}: {pattern}")
    assert not offenders, offenders


def test_device_and_amp_are_checked():
    assert D.resolve("cpu") == torch.device("cpu")
    assert D.check_amp(torch.device("cpu"), "none") == "none"
    with pytest.raises(ValueError, match="--device cuda"):
        D.check_amp(torch.device("cpu"), "fp16")
    with pytest.raises(ValueError, match="unknown --amp"):
        D.check_amp(torch.device("cuda"), "fp8")
    assert D.check_amp(torch.device("cuda"), "BF16") == "bf16"  # no CUDA needed to check the setting
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            D.resolve("cuda")


def test_cli_refuses_amp_on_cpu_and_a_missing_bundle(tmp_path, capsys):
    assert cli.main(["--amp", "fp16", "--out", str(tmp_path / "a")]) == 2
    assert "--device cuda" in capsys.readouterr().err
    assert cli.main(["--modes", "sw", "--bundle", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "no MONAI bundle at" in err and "--bundle" in err
    assert not (tmp_path / "b").exists()  # nothing measured, nothing written
    if not torch.cuda.is_available():
        assert cli.main(["--device", "cuda", "--out", str(tmp_path / "c")]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_build_model_fuses_before_moving_and_keeps_onnx_on_the_cpu():
    fn, net = build_model("ulite-fused", 2, device="cpu")
    assert all(p.device.type == "cpu" for p in net.parameters())
    with pytest.raises(ValueError, match="CPU only"):
        build_model("ulite-onnx", 2, device="cuda")  # refused before anything touches CUDA


def test_the_default_row_is_the_network_users_train_and_the_unfused_row_the_reference():
    _, default = build_model("ulite-default", 3, train=True)
    _, reference = build_model("ulite", 3, train=True)
    assert default.training and reference.training
    assert default.implementation() == ULite(spatial_dims=3, in_channels=1, out_channels=2).implementation()
    assert default.implementation() != "reference" and reference.implementation() == "reference"
    assert default.state_dict().keys() == reference.state_dict().keys()
    _, default_eval = build_model("ulite-default", 2)
    assert not default_eval.training


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_training_step_under_autocast_and_grad_scaler(amp):
    """The step the CUDA benchmark runs (autocast + GradScaler for fp16), here on the CPU's autocast."""
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    x = torch.randn(2, 3, 16, 16)
    y = make_labels(x, 2)
    assert y.shape == (2, 1, 16, 16) and set(y.unique().tolist()) <= {0.0, 1.0}
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    step = make_step(net, x, y, DiceCELoss(softmax=True, to_onehot_y=True), opt, amp)
    losses = [float(step()) for _ in range(3)]
    assert all(np.isfinite(losses))
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the optimiser stepped
    if amp == "none":
        assert losses[-1] < losses[0]


def test_markdown_of_a_cuda_report_names_the_gpu_and_gpu_memory(tmp_path):
    """The GPU report's rendering, from a hand-made result (no GPU needed to check the tables)."""
    env = dict(report.environment(), device="cuda:0", amp="fp16",
               cuda_device={"gpu": "Test GPU", "gpu_memory_gb": 80.0, "compute_capability": "9.0", "driver": "1.2",
                            "cuda": "13.0", "cudnn": 91000, "cudnn_benchmark": True, "tf32_cudnn": True,
                            "tf32_matmul": False})
    step = {"median_ms": 10.0, "p90_ms": 11.0, "n": 10}
    training = {"device": "cuda:0", "amp": "fp16", "workloads": [{
        "name": "3d", "description": "3D test", "dims": 3, "input_shape": [4, 1, 96, 96, 96], "loss": "L",
        "optimizer": "AdamW", "results": [
            {"model": "ulite", "label": "U-Lite", "family": "ulite", "params": 64178, "step": step,
             "samples_per_s": 400.0, "peak_gpu_mb": 1234.0, "notes": []},
            {"model": "monai-unet", "label": "MONAI UNet", "family": "monai", "params": 4_810_000,
             "step": dict(step, median_ms=5.0), "samples_per_s": 800.0, "peak_gpu_mb": 999.0, "notes": []}],
        "ratios": [{"model": "ulite", "versus": "monai-unet", "speedup": 0.5}]}]}
    sw = {"volume": [512, 512, 128], "device": "cuda:0", "amp": "fp16", "runs": [
        {"label": "U-Lite fused", "roi": [64] * 3, "sw_batch_size": 2, "overlap": 0.25, "wall_s": 0.6114,
         "peak_gpu_mb": 2048.0}], "best": {"U-Lite fused": {"roi": [64] * 3, "sw_batch_size": 2, "overlap": 0.25,
                                                            "wall_s": 0.6114, "peak_gpu_mb": 2048.0}}}
    md = report.markdown({"environment": env, "created_utc": "now", "command": "x", "training_step": training,
                          "sliding_window": sw})
    assert "GPU: Test GPU (80.0 GB, compute capability 9.0), driver 1.2, CUDA 13.0" in md
    assert "autocast: fp16" in md and "CUDA events" in md
    assert "| U-Lite | 64 K | 10.0 | 11.0 | 10 | 400.0 | 1234 |" in md
    assert "peak GPU memory (MB)" in md and "U-Lite against MONAI UNet: 2.00x slower" in md
    assert "| 0.611 | 2048 |" in md  # GPU times in ms resolution
    png = report.plot_training(training, tmp_path / "t.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_training_step_mode(tmp_path):
    out = tmp_path / "bench"
    rc = cli.main(["--quick", "--modes", "train", "--train-workloads", "3d", "bundle", "--train-models", "ulite",
                   "ulite-cl", "ulite-reference", "monai-unet", "--threads", "1", "--bundle", str(BUNDLE),
                   "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "benchmark.json").read_text())
    assert data["environment"]["device"] == "cpu" and data["bundle"]["root"] == str(BUNDLE)
    tr = data["training_step"]
    assert tr["device"] == "cpu" and tr["amp"] == "none"
    wl = {w["name"]: w for w in tr["workloads"]}
    assert set(wl) == {"3d", "bundle"}
    assert wl["3d"]["input_shape"] == [1, 1, 32, 32, 32]  # --quick sizes
    assert wl["bundle"]["input_shape"] == [2, 1, 32, 32, 32]  # batch_size 1 x the bundle's num_samples 2
    assert "AdamW" in wl["bundle"]["optimizer"] and "lr=0.003" in wl["bundle"]["optimizer"]
    for w in wl.values():
        res = {r["model"]: r for r in w["results"]}
        assert all(r["status"] == "ok" for r in res.values()), w["results"]
        assert res["ulite"]["params"] == res["ulite-cl"]["params"] == res["ulite-reference"]["params"] == 64_178
        assert res["ulite-reference"]["family"] == "ulite"  # the bundle's widths 8..128, reference axial convs
        assert res["monai-unet"]["params"] > 4_000_000
        for r in res.values():
            assert r["step"]["n"] == 2 and r["step"]["median_ms"] > 0 and r["samples_per_s"] > 0
            assert r["step_rss_growth_mb"] >= 0
        ratio = {(q["model"], q["versus"]): q["speedup"] for q in w["ratios"]}
        assert ratio[("ulite", "monai-unet")] == pytest.approx(
            res["monai-unet"]["step"]["median_ms"] / res["ulite"]["step"]["median_ms"])
        assert ("ulite-cl", "monai-unet") in ratio and ("ulite-reference", "monai-unet") in ratio
    md = (out / "benchmark.md").read_text()
    assert "## Training step" in md and "| U-Lite channels-last | 64 K |" in md
    assert (out / "training_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_step_of_the_2d_bundle_and_a_bundle_without_sizes(tmp_path, capsys):
    bundle_2d = BUNDLE.parent / "ulite_2d"
    out = tmp_path / "bench"
    rc = cli.main(["--quick", "--modes", "train", "--train-workloads", "bundle", "--train-models", "ulite",
                   "monai-unet", "--threads", "1", "--bundle", str(bundle_2d), "--out", str(out)])
    assert rc == 0
    wl = json.loads((out / "benchmark.json").read_text())["training_step"]["workloads"][0]
    assert wl["input_shape"] == [1, 3, 64, 64]  # batch_size 1 of --quick x 3-channel images of 64x64 (image_size)
    assert "images of 64x64" in wl["description"]
    res = {r["model"]: r for r in wl["results"]}
    assert res["ulite"]["status"] == "ok" and res["ulite"]["params"] == 878_417  # the 2D bundle is the paper's net
    assert res["monai-unet"]["status"] == "ok" and res["ulite"]["step"]["median_ms"] > 0

    broken = tmp_path / "nosize"
    shutil.copytree(bundle_2d, broken, ignore=shutil.ignore_patterns("dataset", "models", "eval", "logs"))
    cfg = json.loads((broken / "configs" / "train.json").read_text())
    del cfg["image_size"]
    (broken / "configs" / "train.json").write_text(json.dumps(cfg))
    rc = cli.main(["--quick", "--modes", "train", "--train-workloads", "bundle", "--train-models", "ulite",
                   "--threads", "1", "--bundle", str(broken), "--out", str(tmp_path / "b2")])
    err = capsys.readouterr().err
    assert rc == 2 and "patch_size (or image_size" in err and str(broken) in err


def _threshold_checkpoint(path: Path, hu_threshold: float, intensity_range=(-200.0, 300.0)) -> Path:
    """Weights of a 1x1x1 Conv3d whose argmax is ``HU > hu_threshold`` after the bundle's intensity scaling."""
    t = (hu_threshold - intensity_range[0]) / (intensity_range[1] - intensity_range[0])
    k = 50.0
    torch.save({"weight": torch.tensor([0.0, k]).reshape(2, 1, 1, 1, 1), "bias": torch.tensor([0.0, -k * t])}, path)
    return path


def test_segment_gives_labels_on_the_input_grid(tmp_path):
    import SimpleITK as sitk
    from support.bundle import blob_volume, sitk_image

    from ulite_monai.bench.quality import segment

    arr = blob_volume(shape=(24, 40, 36), seed=3)  # (z, y, x) int16
    img = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(sitk_image(arr, spacing=(1.3, 1.1, 2.2)), str(img))
    ckpt = _threshold_checkpoint(tmp_path / "model.pt", hu_threshold=100.0)
    ov = {"network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1},
          "pixdim": [1.6, 1.6, 1.6], "roi_size": [32, 32, 32], "keep_largest_component": False}
    seg = segment(BUNDLE, ckpt, img, device="cpu", overrides=ov)
    assert seg.dtype == np.uint8 and seg.shape == (36, 40, 24)  # the image's (x, y, z) grid, channel dropped
    expected = np.transpose(arr, (2, 1, 0)) > 100.0
    dice = 2 * np.logical_and(seg > 0, expected).sum() / ((seg > 0).sum() + expected.sum())
    assert dice > 0.9
    flipped = expected[::-1]
    assert 2 * np.logical_and(seg > 0, flipped).sum() / ((seg > 0).sum() + flipped.sum()) < 0.6
    assert set(np.unique(seg).tolist()) <= {0, 1}
    assert not list(tmp_path.glob("*_seg.nii.gz"))  # the pipeline's written output went to a removed temp folder


def test_segment_runs_a_monai_unet_checkpoint_through_the_bundle(tmp_path):
    """Quality mode evaluates MONAI UNet through the same pipeline: only ``network_def`` is swapped."""
    import SimpleITK as sitk
    from monai.networks.nets import UNet
    from support.bundle import blob_volume, sitk_image

    from ulite_monai.bench.quality import NETWORK_DEFS, segment

    torch.manual_seed(0)
    unet = UNet(3, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)  # keys "model.*"
    ckpt = tmp_path / "unet.pt"
    torch.save(unet.state_dict(), ckpt)
    img = tmp_path / "vol.nii.gz"
    sitk.WriteImage(sitk_image(blob_volume(shape=(20, 30, 28), seed=4)), str(img))
    seg = segment(BUNDLE, ckpt, img, overrides={"network_def": NETWORK_DEFS["monai-unet"], "pixdim": [2.0] * 3})
    assert seg.shape == (28, 30, 20) and seg.dtype == np.uint8
    assert set(np.unique(seg).tolist()) <= {0, 1}


def test_in_process_gpu_procedures_run_on_the_cpu():
    """The CUDA procedures of the speed and sliding-window modes (one process, timer and memory readings per
    device) are device-agnostic: on the CPU they run the same code with wall-clock timing and zero GPU memory."""
    from ulite_monai.bench.sliding import _runs_cuda
    from ulite_monai.bench.speed import _run_speed_cuda

    cpu = torch.device("cpu")
    sp = _run_speed_cuda(["ulite", "ulite-fused", "ulite-onnx"], cpu, "none", dims_list=[2], repeats=3, repeats_3d=3,
                         warmup=1, burst=2, throughput_batch=2, train_batch=2, train=True, size_2d=(32, 32),
                         size_3d=(32, 32, 32), max_model_s=60, log=lambda m: None)
    res = {r["model"]: r for r in sp["results"]}
    assert res["ulite-onnx"]["status"] == "skipped" and "CPU only" in res["ulite-onnx"]["notes"][0]
    for m in ("ulite", "ulite-fused"):
        r = res[m]
        assert r["status"] == "ok" and r["params"] == 878_417 and r["flops"] > 0
        assert r["latency_bs1"]["n"] == 3 and r["latency_bs1_cold"]["n"] == 3 and r["throughput_per_s"] > 0
        assert r["infer_peak_gpu_mb"] == pytest.approx(3 * 32 * 32 * 4 / 2**20)  # no GPU: only the input counts
    assert res["ulite"]["train_step"]["n"] == 3 and "train_step" not in res["ulite-fused"]
    assert [q["model"] for q in sp["ratios"]] == ["ulite-fused"]
    base = {"roi_size": [32] * 3, "sw_batch_size": 2, "overlap": 0.25, "mode": "gaussian",
            "features": [8, 16, 32, 64, 128]}
    runs = _runs_cuda(["ulite-fused", "ulite-onnx"], (40, 40, 32), [base], cpu, "none", 2, 60, lambda m: None)
    assert [r["status"] for r in runs] == ["ok", "skipped"]
    assert len(runs[0]["wall_s_runs"]) == 2 and runs[0]["peak_gpu_mb"] == 0
    assert runs[0]["features"] == [8, 16, 32, 64, 128] and runs[0]["params"] < 200_000  # the fused bundle widths
