"""ULite's training-time implementations (axial_impl): same parameters, same outputs and gradients as the
reference computation, in train and eval mode, 2D and 3D; the layers they are built from."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ulite_monai.networks import AxialDWConv, ULite, ULiteBottleneck, ULiteDecoderBlock, ULiteEncoderBlock
from ulite_monai.networks.axial import (
    AXIAL_IMPLS,
    axial_dense_kernel,
    axial_merged,
    axial_views,
    conv3d_by_planes,
    pointwise_conv,
    resolve_axial_impl,
    upsample_add,
)

FAST = ["merged", "views"]


def randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, larger axial taps (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
            if isinstance(m, AxialDWConv):
                for conv in m.convs:
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=conv.weight.dtype) * 0.3)
                    conv.bias.copy_(torch.randn(conv.bias.shape, generator=g, dtype=conv.bias.dtype) * 0.1)
    return net


def twin(impl: str, **kwargs) -> tuple[ULite, ULite]:
    """A reference-implementation ULite and one with ``impl`` holding the same parameters (float64)."""
    ref = randomise(ULite(axial_impl="reference", **kwargs)).double()
    net = ULite(axial_impl=impl, **kwargs).double()
    net.load_state_dict(ref.state_dict())
    return ref, net


def grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def assert_close_grads(a: dict, b: dict, tol: float) -> None:
    scale = max(v.abs().max().item() for v in a.values())
    for k in a:
        err = (a[k] - b[k]).abs().max().item()
        assert err <= tol * scale, f"{k}: gradient differs by {err:.3g} (gradient scale {scale:.3g})"


# ---------------------------------------------------------------- the network


def test_same_parameters_and_state_dict_for_every_impl():
    shapes = None
    for impl in AXIAL_IMPLS:
        for dims in (2, 3):
            net = ULite(dims, 1, 2, features=(4, 8, 16), axial_impl=impl)
            sd = {k: tuple(v.shape) for k, v in net.state_dict().items()}
            if dims == 2:
                shapes = shapes or sd
                assert sd == shapes, impl
    # the paper's count whatever the implementation
    assert sum(p.numel() for p in ULite(2, 3, 1, axial_impl="merged").parameters()) == 878_417


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("dims", [2, 3])
def test_outputs_and_gradients_match_reference(impl, dims):
    torch.manual_seed(0)
    shape = (2, 3, 40, 36) if dims == 2 else (2, 1, 12, 10, 14)  # not multiples of 8: padding and cropping
    feats = (4, 8, 16, 32, 64) if dims == 2 else (4, 8, 16, 32)
    ref, net = twin(impl, spatial_dims=dims, in_channels=shape[1], out_channels=2, features=feats)
    x = torch.randn(*shape, dtype=torch.float64)
    for mode in ("train", "eval"):
        ref.train(mode == "train")
        net.train(mode == "train")
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        ya, yb = ref(xa), net(xb)
        assert yb.shape == ya.shape and yb.is_contiguous()
        assert (ya - yb).abs().max().item() <= 1e-10 * ya.abs().max().item(), mode
        g = torch.randn_like(ya)
        ref.zero_grad()
        net.zero_grad()
        ya.backward(g)
        yb.backward(g)
        assert_close_grads(grads(ref), grads(net), 1e-10)
        assert (xa.grad - xb.grad).abs().max().item() <= 1e-10 * xa.grad.abs().max().item()
    # batch statistics were tracked identically
    for (name, a), b in zip(ref.named_buffers(), net.buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=0, atol=1e-12), name


@pytest.mark.parametrize("impl", FAST)
def test_training_steps_follow_the_reference(impl):
    """A few optimiser steps with each implementation end at the same parameters (float32, CPU).

    SGD, not Adam: the biases before a training-mode BatchNorm have a zero gradient up to rounding, which
    Adam's normalisation would turn into full-size steps in directions set by rounding noise."""
    torch.manual_seed(1)
    ref = ULite(2, 1, 2, features=(8, 16, 32), axial_impl="reference")
    net = ULite(2, 1, 2, features=(8, 16, 32), axial_impl=impl)
    net.load_state_dict(ref.state_dict())
    x = torch.randn(4, 1, 32, 32)
    y = torch.randint(0, 2, (4, 32, 32))
    for model in (ref, net):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for (name, a), b in zip(ref.state_dict().items(), net.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name


def test_checkpoints_move_between_implementations(tmp_path):
    ref = randomise(ULite(3, 1, 2, features=(4, 8, 16), axial_impl="reference")).eval()
    path = tmp_path / "m.pt"
    torch.save(ref.state_dict(), path)
    fast = ULite(3, 1, 2, features=(4, 8, 16), axial_impl="merged").eval()
    fast.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(fast(x), ref(x), rtol=1e-4, atol=1e-5)


def test_auto_resolution_and_errors():
    assert resolve_axial_impl("auto", "cpu", 2) == "merged"
    assert resolve_axial_impl("auto", "cpu", 3) == "merged"
    assert resolve_axial_impl("auto", "cuda", 2) == "views"
    assert resolve_axial_impl("auto", "cuda", 3) == "views"
    assert resolve_axial_impl("auto", "cpu", 1) == "reference"
    assert resolve_axial_impl("views", "cpu", 2) == "views"
    assert ULite(2, 1, 1).implementation() == "merged"
    assert ULite(2, 1, 1).implementation("cuda") == "views"
    with pytest.raises(ValueError, match="axial_impl"):
        ULite(2, 1, 1, axial_impl="fast")
    with pytest.raises(ValueError, match="spatial_dims 2 or 3"):
        ULite(1, 1, 1, axial_impl="merged")
    net = ULite(1, 1, 2, features=(4, 8))  # 1D: auto is the reference computation
    assert net(torch.randn(2, 1, 30)).shape == (2, 2, 30)


def test_torchscript_scripts_the_reference_computation():
    net = randomise(ULite(2, 1, 2, features=(4, 8, 16), axial_impl="merged")).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 24, 20)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net.reference_forward(x), atol=1e-6)
        assert torch.allclose(scripted(x), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_bf16_autocast_training_on_cpu(dims):
    torch.manual_seed(0)
    shape = (2, 1, 32, 32) if dims == 2 else (2, 1, 16, 16, 16)
    ref = ULite(dims, 1, 2, features=(8, 16, 32), axial_impl="reference").train()
    net = ULite(dims, 1, 2, features=(8, 16, 32), axial_impl="merged").train()
    net.load_state_dict(ref.state_dict())
    x = torch.randn(*shape)
    out = {}
    for name, model in (("ref", ref), ("fast", net)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
                   for p in model.parameters())
        out[name] = y.float()
    # bf16 keeps ~3 significant digits: the two computations agree to that precision
    assert (out["ref"] - out["fast"]).abs().max() <= 0.05 * out["ref"].abs().max()


# ---------------------------------------------------------------- blocks and layers


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kernel_size,dilation", [(7, 1), (3, 1), (3, 2), (3, 3), (5, 2)])
def test_axial_block_matches_reference(impl, dims, kernel_size, dilation):
    torch.manual_seed(kernel_size * 10 + dilation)
    ref = randomise(AxialDWConv(dims, 5, kernel_size, dilation, impl="reference")).double()
    blk = AxialDWConv(dims, 5, kernel_size, dilation, impl=impl).double()
    blk.load_state_dict(ref.state_dict())
    shape = (2, 5, 13, 11) if dims == 2 else (2, 5, 9, 7, 8)
    for mode in (True, False):
        ref.train(mode)
        blk.train(mode)
        xa = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        xb = xa.detach().clone().requires_grad_()
        ya, yb = ref(xa), blk(xb)
        assert torch.allclose(ya, yb, rtol=0, atol=1e-12)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert torch.allclose(xa.grad, xb.grad, rtol=0, atol=1e-11)
        for (name, p), q in zip(ref.named_parameters(), blk.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-10), name
        ref.zero_grad()
        blk.zero_grad()


@pytest.mark.parametrize("dims", [2, 3])
def test_merged_axial_gradcheck(dims):
    torch.manual_seed(0)
    c = 3
    shape = (2, c, 7, 6) if dims == 2 else (1, c, 5, 6, 4)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ks, ds = (3, 5, 3)[:dims], (2, 1, 1)[:dims]
    weights = []
    for axis, k in enumerate(ks):
        shp = [c, 1] + [k if a == axis else 1 for a in range(dims)]
        weights.append(torch.randn(*shp, dtype=torch.float64, requires_grad=True))
    biases = [torch.randn(c, dtype=torch.float64, requires_grad=True) for _ in range(dims)]

    def fn(x, *params):
        return axial_merged(x, params[:dims], params[dims:], ds)

    assert torch.autograd.gradcheck(fn, (x, *weights, *biases), fast_mode=True)
    # and the same values as per-axis convs
    conv = F.conv2d if dims == 2 else F.conv3d
    ref = x
    for axis, (w, b, d) in enumerate(zip(weights, biases, ds)):
        pad = [d * (ks[axis] - 1) // 2 if a == axis else 0 for a in range(dims)]
        dil = [d if a == axis else 1 for a in range(dims)]
        ref = ref + conv(x, w, b, padding=pad, dilation=dil, groups=c)
    assert torch.allclose(fn(x, *weights, *biases), ref, atol=1e-12)
    assert torch.allclose(axial_views(x, weights, biases, ds), ref, atol=1e-12)


def test_merged_axial_gradients_of_frozen_parts():
    """Only what needs a gradient gets one (frozen weights, an input without gradient)."""
    c = 4
    x = torch.randn(1, c, 6, 5, 7, dtype=torch.float64)
    ws = [torch.randn(c, 1, 3, 1, 1, dtype=torch.float64, requires_grad=True),
          torch.randn(c, 1, 1, 3, 1, dtype=torch.float64),
          torch.randn(c, 1, 1, 1, 3, dtype=torch.float64, requires_grad=True)]
    bs = [torch.randn(c, dtype=torch.float64) for _ in range(3)]
    axial_merged(x, ws, bs, (1, 1, 1)).sum().backward()
    assert ws[0].grad is not None and ws[2].grad is not None and ws[1].grad is None
    xg = x.clone().requires_grad_()
    axial_merged(xg, [w.detach() for w in ws], bs, (1, 1, 1)).sum().backward()
    assert xg.grad is not None and ws[0].grad.abs().sum() > 0


def test_dense_kernel_places_taps_on_the_cross():
    taps = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[4.0, 5.0, 6.0]])]
    k, reach = axial_dense_kernel(taps, [2, 1], identity=True)
    assert reach == 2 and k.shape == (1, 1, 5, 5)
    expected = torch.zeros(5, 5)
    expected[0, 2], expected[2, 2], expected[4, 2] = 1.0, 2.0, 3.0  # dilation 2 along the first axis
    expected[2, 1], expected[2, 2], expected[2, 3] = 4.0, expected[2, 2] + 5.0, 6.0
    expected[2, 2] += 1.0  # identity
    assert torch.equal(k[0, 0], expected)


@pytest.mark.parametrize("fmt", [None, torch.channels_last, torch.channels_last_3d])
def test_upsample_add(fmt):
    dims = 3 if fmt is torch.channels_last_3d else 2
    hi = torch.randn((2, 3) + (4, 6, 8)[:dims], dtype=torch.float64)
    lo = torch.randn((2, 3) + (2, 3, 4)[:dims], dtype=torch.float64)
    if fmt is not None:
        hi, lo = hi.contiguous(memory_format=fmt), lo.contiguous(memory_format=fmt)
    hi.requires_grad_()
    lo.requires_grad_()
    out = upsample_add(lo, hi)
    assert torch.equal(out, F.interpolate(lo, scale_factor=2.0, mode="nearest") + hi)
    if fmt is not None:
        assert out.is_contiguous(memory_format=fmt)
    assert torch.autograd.gradcheck(upsample_add, (lo, hi), fast_mode=True)
    with pytest.raises(ValueError, match="twice"):
        upsample_add(hi, hi)
    # the other devices' form (every pair broadcast, nothing repeated), here on the CPU
    from ulite_monai.networks.axial import _UpsampleAdd

    assert torch.equal(_UpsampleAdd.apply(lo, hi, False), out)
    assert torch.autograd.gradcheck(lambda a, b: _UpsampleAdd.apply(a, b, False), (lo, hi), fast_mode=True)


@pytest.mark.parametrize("c_in", [1, 2])
@pytest.mark.parametrize("depth_block", [None, 1, 2, 4, 7])
def test_conv3d_by_planes_matches_conv3d(c_in, depth_block):
    # depth 6: blocks of 4 and 7 run past the input's depth and are cropped; None picks 4 for 3 output channels
    x = torch.randn(2, c_in, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, c_in, 5, 3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    ref = F.conv3d(x, w, b, padding=(2, 1, 3))
    out = conv3d_by_planes(x, w, b, depth_block=depth_block)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(ref)
    for a, b_ in zip(torch.autograd.grad(ref, (x, w, b), g), torch.autograd.grad(out, (x, w, b), g)):
        assert torch.allclose(a, b_, atol=1e-11)


def test_conv3d_by_planes_depth_blocks():
    from ulite_monai.networks.axial import _depth_block

    assert [_depth_block(o, "cpu") for o in (1, 3, 4, 8, 16, 32)] == [4, 4, 4, 2, 1, 1]
    assert _depth_block(8, "cuda") == 1
    x = torch.randn(1, 1, 4, 5, 5, dtype=torch.float64)
    w = torch.randn(8, 1, 3, 3, 3, dtype=torch.float64)
    ref = F.conv3d(x, w, None, padding=1)
    assert torch.allclose(conv3d_by_planes(x, w, None), ref, atol=1e-12)  # no bias, default block (2)
    with pytest.raises(ValueError, match="depth_block"):
        conv3d_by_planes(x, w, None, depth_block=0)


@pytest.mark.parametrize("fmt", [None, torch.channels_last_3d])
def test_pointwise_conv(fmt):
    x = torch.randn(2, 4, 3, 5, 6, dtype=torch.float64)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w = torch.randn(7, 4, 1, 1, 1, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    assert torch.allclose(pointwise_conv(x, w, b), F.conv3d(x, w, b), atol=1e-12)
    x2 = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    assert torch.allclose(pointwise_conv(x2, w[..., 0], b), F.conv2d(x2, w[..., 0], b), atol=1e-12)


@pytest.mark.parametrize("impl", FAST)
def test_blocks_match_reference_forward(impl):
    torch.manual_seed(3)
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    skip = torch.randn(2, 8, 32, 32, dtype=torch.float64)
    enc = randomise(ULiteEncoderBlock(2, 8, 16, axial_impl=impl)).double().eval()
    dec = randomise(ULiteDecoderBlock(2, 8, 8, axial_impl=impl)).double().eval()
    bott = randomise(ULiteBottleneck(2, 8, axial_impl=impl)).double().eval()
    a, s = enc(x)
    ra, rs = enc.reference_forward(x)
    assert torch.allclose(a, ra, atol=1e-12) and torch.allclose(s, rs, atol=1e-12)
    assert torch.allclose(dec(x, skip), dec.reference_forward(x, skip), atol=1e-12)
    assert torch.allclose(bott(x), bott.reference_forward(x), atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("dims", [2, 3])
def test_torch_compile_training_step(dims):
    torch.manual_seed(0)
    shape = (2, 1, 32, 32) if dims == 2 else (2, 1, 16, 16, 16)
    ref = ULite(dims, 1, 2, features=(4, 8, 16), axial_impl="reference").train()
    net = ULite(dims, 1, 2, features=(4, 8, 16), axial_impl="merged").train()
    net.load_state_dict(ref.state_dict())
    compiled = torch.compile(net, dynamic=False)
    x = torch.randn(*shape)
    y = compiled(x)
    y.square().mean().backward()
    yr = ref(x)
    yr.square().mean().backward()
    assert torch.allclose(y, yr, rtol=1e-4, atol=1e-5)
    assert_close_grads(grads(ref), grads(net), 1e-4)


# ---------------------------------------------------------------- batch norm of few channels (CPU training path)


@pytest.mark.parametrize("dims,channels,momentum", [(3, 8, 0.1), (2, 4, None), (3, 12, 0.3)])
def test_few_channel_batch_norm_matches_batchnorm(dims, channels, momentum):
    """``batch_norm`` on a channels-last input of few channels: nn.BatchNorm's outputs, gradients and running
    statistics over two training steps and in eval mode, and a channels-last result."""
    from ulite_monai.networks.axial import batch_norm

    torch.manual_seed(0)
    cls = torch.nn.BatchNorm3d if dims == 3 else torch.nn.BatchNorm2d
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    ref = cls(channels, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.copy_(torch.rand(channels) + 0.5)
        ref.bias.copy_(torch.rand(channels) - 0.5)
    ours = copy.deepcopy(ref).float()
    shape = (3, channels) + (10, 12, 6)[:dims]
    for step in range(2):
        x = (torch.randn(shape, dtype=torch.float64) * 3 + 5).contiguous(memory_format=fmt)  # mean >> std
        g = torch.randn(shape, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(True), x.float().contiguous(memory_format=fmt).requires_grad_(True)
        ya, yb = ref(xa), batch_norm(ours, xb)
        assert yb.is_contiguous(memory_format=fmt) and yb.dtype == torch.float32
        ya.backward(g)
        yb.backward(g.float())
        assert (ya - yb).abs().max().item() < 1e-5, step
        assert (xa.grad - xb.grad).abs().max().item() < 1e-5 * xa.grad.abs().max().item() + 1e-6, step
        for p in ("weight", "bias"):
            a, b = getattr(ref, p).grad, getattr(ours, p).grad
            assert (a - b).abs().max().item() < 1e-4 * a.abs().max().item(), (step, p)
            getattr(ref, p).grad = getattr(ours, p).grad = None
        for name in ("running_mean", "running_var"):
            assert torch.allclose(getattr(ref, name).float(), getattr(ours, name), rtol=1e-5, atol=1e-6), name
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
    ref.eval()
    ours.eval()
    x = torch.randn(shape).contiguous(memory_format=fmt)
    assert torch.equal(batch_norm(ours, x), ours(x))  # eval mode: the module itself (running statistics)


def test_batch_norm_falls_back_to_the_module():
    """Inputs the few-channel path does not take go to the module unchanged: 16+ channels, NCHW, eval mode,
    and a single value per channel raises nn.BatchNorm's own error."""
    from ulite_monai.networks.axial import batch_norm

    torch.manual_seed(0)
    for channels, fmt in ((16, torch.channels_last_3d), (8, torch.contiguous_format)):
        bn = torch.nn.BatchNorm3d(channels)
        twin_bn = copy.deepcopy(bn)
        x = torch.randn(2, channels, 4, 4, 4).contiguous(memory_format=fmt)
        assert torch.equal(batch_norm(bn, x), twin_bn(x))
        assert torch.equal(bn.running_mean, twin_bn.running_mean)
    untracked = torch.nn.BatchNorm2d(8, track_running_stats=False).eval()  # batch statistics in eval mode
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    assert torch.allclose(batch_norm(untracked, x), untracked(x), atol=1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm(torch.nn.BatchNorm2d(8), torch.randn(1, 8, 1, 1).contiguous(memory_format=torch.channels_last))


def test_few_channel_batch_norm_keeps_metatensor_batches():
    """A collated MONAI batch (a MetaTensor with per-item metadata, as the bundle's trainer feeds it) goes
    through the few-channel path and the network like a plain tensor, keeping its metadata and its gradient."""
    from monai.data import MetaTensor, list_data_collate

    from ulite_monai.networks.axial import batch_norm

    torch.manual_seed(0)
    items = [{"image": MetaTensor(torch.randn(1, 16, 16, 16), meta={"filename_or_obj": f"case{i}.nii.gz"})}
             for i in range(3)]
    batch = list_data_collate(items)["image"]
    assert isinstance(batch, MetaTensor) and batch.is_batch
    bn = torch.nn.BatchNorm3d(8)
    twin_bn = copy.deepcopy(bn)
    x = torch.randn(3, 8, 16, 16, 16).contiguous(memory_format=torch.channels_last_3d)
    xm = MetaTensor(x.clone(), meta=batch.meta)
    xm.is_batch = True
    xm.requires_grad_(True)
    y = batch_norm(bn, xm)
    assert isinstance(y, MetaTensor) and y.is_batch and y.meta["filename_or_obj"] == batch.meta["filename_or_obj"]
    assert torch.allclose(y.as_tensor(), twin_bn(x), atol=1e-5)
    y.sum().backward()
    assert xm.grad is not None and xm.grad.abs().max() < 1e-3  # d(sum of a batch-normalised tensor)/dx is ~0
    net = ULite(3, 1, 2, features=(8, 16, 32)).train()
    out = net(batch)
    out.sum().backward()
    assert isinstance(out, MetaTensor)
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("channels,width,factor",
                         [(8, 10, 2), (4, 12, 4), (4, 10, 2), (8, 9, 1), (16, 8, 1), (3, 8, 4)])
def test_paired_views_keep_kx1_depthwise_convs(channels, width, factor):
    from ulite_monai.networks.axial import _paired

    x = torch.randn(2, channels, 6, width, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    v, f = _paired(x)
    assert f == factor and v.shape == (2, channels * f, 6, width // f)
    assert v.data_ptr() == x.data_ptr()  # a view, no copy
    w = torch.randn(channels, 1, 5, 1, dtype=torch.float64)
    y = F.conv2d(x, w, None, padding=(2, 0), groups=channels)
    yv = F.conv2d(v, w.repeat(f, 1, 1, 1), None, padding=(2, 0), groups=channels * f)
    assert torch.allclose(_paired(y.contiguous(memory_format=torch.channels_last))[0], yv, atol=1e-12)
