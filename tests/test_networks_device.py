"""ULite, its fused form and its exports on any device and dtype; parity under autocast.

The CPU tests catch device and dtype mistakes without a GPU (a network on the ``meta`` device, a float64
network). The same tests run on CUDA where a GPU is present (marked ``cuda``; skipped elsewhere).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from ulite_monai.networks import ULite, export_torchscript, fuse_ulite, inference_network

from test_networks_training import randomise  # noqa: E402 - shared helper (tests/ is on sys.path)

HAS_CUDA = torch.cuda.is_available()
CUDA_ONLY = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_ONLY)]
AMP = [("cpu", torch.bfloat16), pytest.param("cuda", torch.float16, marks=CUDA_ONLY),
       pytest.param("cuda", torch.bfloat16, marks=CUDA_ONLY)]


def tensors(m: torch.nn.Module) -> list[torch.Tensor]:
    return list(m.parameters()) + list(m.buffers())


def small_net(dims: int, out_channels: int = 2, seed: int = 0, **kw) -> ULite:
    torch.manual_seed(seed)  # fixed weights: the autocast thresholds below hold with margin for them
    feats = (8, 16, 32, 64, 128) if dims == 2 else (8, 16, 32, 64)
    return ULite(dims, 3 if dims == 2 else 1, out_channels, features=feats, **kw)


def example(dims: int, device, batch: int = 2, dtype=torch.float32) -> torch.Tensor:
    shape = (batch, 3, 72, 64) if dims == 2 else (batch, 1, 32, 24, 40)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=dtype).to(device)


@contextlib.contextmanager
def no_tf32():
    """Full fp32 convolutions and matmuls on CUDA (TF32 would round to ~1e-3)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------- fusion keeps device and dtype (CPU-testable)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("merge", [True, False])
def test_fused_tensors_stay_on_the_source_device(dims, merge):
    """A network on the 'meta' device: every fused tensor created on the CPU would show up here."""
    net = small_net(dims).to("meta").eval()
    fused = fuse_ulite(net, merge_axial=merge)
    assert {t.device.type for t in tensors(fused)} == {"meta"}
    assert fused(torch.empty(example(dims, "cpu").shape, device="meta")).device.type == "meta"
    assert inference_network(net).conv_in.weight.device.type == "meta"


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("merge", [True, False])
def test_fused_tensors_keep_the_source_dtype(dims, merge):
    net = randomise(small_net(dims)).double().eval()
    fused = fuse_ulite(net, merge_axial=merge)
    assert {t.dtype for t in tensors(fused) if t.is_floating_point()} == {torch.float64}
    x = example(dims, "cpu", dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(fused(x), net(x)) <= 1e-10  # float64 all through: exact up to float64 rounding


# ---------------------------------------------------------------- any device (CUDA where present)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", [2, 3])
def test_fuse_on_device_fp32_parity(device, dims):
    net = randomise(small_net(dims)).to(device).eval()
    fused = inference_network(net)  # the repro: fusing a network already on the device
    assert {t.device.type for t in tensors(fused)} == {device}
    x = example(dims, device)
    with torch.no_grad(), no_tf32():
        y = fused(x)
        assert y.device.type == device and y.is_contiguous()
        assert rel_err(y, net(x)) <= 1e-4


@pytest.mark.parametrize("device,dtype", AMP)
@pytest.mark.parametrize("dims", [2, 3])
def test_fused_parity_under_autocast(device, dtype, dims):
    net = randomise(small_net(dims, out_channels=3)).to(device).eval()
    fused = fuse_ulite(net)
    x = example(dims, device)
    with torch.no_grad():
        with no_tf32():
            ref = net(x)
        with torch.autocast(device, dtype=dtype):
            y = fused(x)
            y_unfused = net(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    agree = (y.float().argmax(1) == ref.argmax(1)).float().mean().item()
    agree_unfused = (y_unfused.float().argmax(1) == ref.argmax(1)).float().mean().item()
    assert agree >= 0.995, f"fused {dtype} mask agreement {agree:.4f}"
    assert agree_unfused >= 0.995, f"unfused {dtype} mask agreement {agree_unfused:.4f}"
    assert rel_err(y, ref) <= (0.02 if dtype == torch.float16 else 0.05)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", [2, 3])
def test_training_implementations_on_device(device, dims):
    """Every axial_impl trains on the device with the reference's outputs and gradients (fp32, TF32 off)."""
    torch.manual_seed(0)
    ref = randomise(small_net(dims, axial_impl="reference")).to(device).train()
    x = example(dims, device)
    with no_tf32():
        y_ref = ref(x)
        g = torch.randn_like(y_ref)
        y_ref.backward(g)
        ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        scale = max(v.abs().max().item() for v in ref_grads.values())
        for impl in ("auto", "merged", "views"):
            net = small_net(dims, axial_impl=impl).to(device).train()
            net.load_state_dict(ref.state_dict())
            y = net(x)
            assert rel_err(y, y_ref) <= 1e-4, impl
            y.backward(g)
            for n, p in net.named_parameters():
                assert (p.grad - ref_grads[n]).abs().max().item() <= 1e-3 * scale, (impl, n)


@pytest.mark.parametrize("device,dtype", AMP)
@pytest.mark.parametrize("dims", [2, 3])
def test_training_step_under_autocast(device, dtype, dims):
    net = small_net(dims).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    x = example(dims, device)
    target = (x[:, :1] > 0).long().squeeze(1)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast(device, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(net(x), target)
        scaler.scale(loss).backward()
        assert all(p.grad.dtype == torch.float32 for p in net.parameters())
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_torchscript_export_on_device(device, tmp_path):
    net = randomise(small_net(2)).to(device).eval()
    scripted = export_torchscript(net, tmp_path / "m.ts")
    loaded = torch.jit.load(str(tmp_path / "m.ts"), map_location=device)
    x = example(2, device, batch=1)
    with torch.no_grad(), no_tf32():
        assert rel_err(loaded(x), net(x)) <= 1e-4
        assert rel_err(scripted(x), net(x)) <= 1e-4
    unfused = export_torchscript(net, tmp_path / "u.ts", fuse=False)
    with torch.no_grad(), no_tf32():
        assert rel_err(unfused(x), net(x)) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_onnx_export_of_a_network_on_device(device, tmp_path):
    import numpy as np

    from ulite_monai.networks import export_onnx, onnx_session

    net = randomise(small_net(2)).to(device).eval()
    path = export_onnx(net, tmp_path / "m.onnx")
    assert net.conv_in.weight.device.type == device  # the caller's network was not moved
    x = example(2, "cpu", batch=1)
    y = onnx_session(path).run(None, {"image": x.numpy()})[0]
    with torch.no_grad(), no_tf32():
        ref = net(x.to(device)).cpu().numpy()
    assert np.abs(y - ref).max() / np.abs(ref).max() <= 1e-4
