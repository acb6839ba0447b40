# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The benchmark on a CUDA GPU (marked ``cuda``; skipped where there is none): models built on the CPU and
moved give the CPU's outputs, the timer and memory readings see device work, and a quick run of every GPU mode
writes its tables. ``scripts/gpu_check.sh`` runs these with ``pytest -m cuda``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ulite_monai.bench import cli, device as D
from ulite_monai.bench.models import build_model
from ulite_monai.bench.workloads import make_infer, make_input, make_labels, make_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "ulite"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dims", [2, 3])
def test_fused_model_on_cuda_gives_the_cpu_outputs(dims):
    size = (96, 80) if dims == 2 else (64, 48, 40)
    x = make_input(dims, 2, size, seed=5)
    fn_cpu, _ = build_model("ulite-fused", dims, size=size)
    fn_gpu, net_gpu = build_model("ulite-fused", dims, size=size, device="cuda")
    assert all(p.device.type == "cuda" for p in net_gpu.parameters())
    ref = make_infer(fn_cpu, x)()
    out = make_infer(fn_gpu, x.cuda())()
    assert out.device.type == "cuda" and out.shape == ref.shape
    assert _rel(out, ref) < 5e-3  # float32 (TF32 convolutions where cuDNN allows them)
    for amp in ("fp16", "bf16"):
        half = make_infer(fn_gpu, x.cuda(), amp)()
        assert torch.isfinite(half).all()
        agree = ((half.float() > 0) == (ref.cuda() > 0)).float().mean() if dims == 2 else \
            (half.argmax(1) == ref.cuda().argmax(1)).float().mean()
        assert agree > 0.99, (amp, float(agree))


def test_cuda_timer_and_peak_memory_see_device_work():
    dev = D.resolve("cuda")
    timer = D.Timer(dev)
    a = torch.randn(4096, 4096, device=dev)
    assert timer(lambda: a @ a) > 0
    before = D.gpu_allocated_mb(dev)
    D.reset_gpu_peak(dev)
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)  # 256 MB
    del big
    assert D.gpu_peak_mb(dev) - before >= 255
    assert D.gpu_allocated_mb(dev) - before < 1


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_training_step_under_autocast_on_cuda(amp):
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.GELU(), torch.nn.Conv3d(8, 2, 1)).cuda()
    x = torch.randn(2, 1, 16, 16, 16, device="cuda")
    y = make_labels(x, 2)
    before = [p.detach().clone() for p in net.parameters()]
    step = make_step(net, x, y, DiceCELoss(softmax=True, to_onehot_y=True), torch.optim.AdamW(net.parameters()), amp)
    losses = [float(step()) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_quick_gpu_run_of_every_mode(tmp_path):
    out = tmp_path / "gpu"
    rc = cli.main(["--device", "cuda", "--amp", "fp16", "--quick", "--modes", "train", "speed", "sw",
                   "--dims", "2", "3",
                   "--models", "ulite", "ulite-fused", "monai-unet", "ulite-onnx", "--train-workloads", "3d", "bundle",
                   "--train-models", "ulite", "ulite-cl", "monai-unet", "--sw-no-sweep", "--bundle", str(BUNDLE),
                   "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "benchmark.json").read_text())
    env = data["environment"]
    assert env["device"].startswith("cuda") and env["amp"] == "fp16"
    assert env["cuda_device"]["gpu"] and env["cuda_device"]["cudnn_benchmark"] is True
    speed = {(r["dims"], r["model"]): r for r in data["speed"]["results"]}
    assert speed[(2, "ulite-onnx")]["status"] == "skipped"  # a CPU runtime
    for dims in (2, 3):
        for m in ("ulite", "ulite-fused", "monai-unet"):
            r = speed[(dims, m)]
            assert r["status"] == "ok", r["notes"]
            assert r["latency_bs1"]["median_ms"] > 0 and r["infer_peak_gpu_mb"] > 0 and r["flops"] > 0
        assert speed[(dims, "ulite")]["train_step"]["median_ms"] > 0 and speed[(dims, "ulite")]["train_peak_gpu_mb"] > 0
    assert speed[(2, "ulite-fused")]["throughput_per_s"] > 0
    for wl in data["training_step"]["workloads"]:
        for r in wl["results"]:
            assert r["status"] == "ok", r["notes"]
            assert r["step"]["median_ms"] > 0 and r["peak_gpu_mb"] > 0
        pairs = {(q["model"], q["versus"]) for q in wl["ratios"]}
        assert pairs >= {("ulite", "monai-unet"), ("ulite-cl", "monai-unet")}
    sw = data["sliding_window"]
    assert sw["device"].startswith("cuda") and all(r["status"] == "ok" for r in sw["runs"])
    assert all(r["peak_gpu_mb"] > 0 and len(r["wall_s_runs"]) == 3 for r in sw["runs"])
    md = (out / "benchmark.md").read_text()
    assert "GPU: " in md and "peak GPU memory" in md
    for png in ("latency_vs_params.png", "training_step.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
