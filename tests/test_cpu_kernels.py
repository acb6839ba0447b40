"""The fused CPU kernels (``ulite_monai.networks.cpu_kernels``) against PyTorch's stock operators: the encoder tail
(batch norm, 1x1 conv and max-pool), the decoder entry (the skip's 1x1 conv, up-sampling add and batch norm), the
decoder tail (1x1 conv and GELU) and the axial block; outputs, gradients, running statistics, tie-breaking of the
max-pool, GELU accuracy, subnormal flushing kept inside the kernels, and the cases left to the stock operators."""

from __future__ import annotations

import copy

import pytest
import torch

import torch.nn.functional as F

from ulite_monai.networks import AxialDWConv, ULite, ULiteDecoderBlock, ULiteEncoderBlock
from ulite_monai.networks import cpu_kernels
from ulite_monai.networks.cpu_kernels import (axial_conv, decoder_entry, encoder_tail, load_extension,
                                              pointwise_gelu)


def _with_norm(blk, dims: int, channels: int, **norm_kw):
    """``blk`` with its batch norm replaced (``norm_kw``) and its affine parameters and running statistics
    randomised, so that a kernel that ignored one of them would show."""
    if norm_kw:
        cls = torch.nn.BatchNorm3d if dims == 3 else torch.nn.BatchNorm2d
        blk.norm = cls(channels, **norm_kw)
    with torch.no_grad():
        blk.norm.weight.uniform_(0.5, 1.5)
        blk.norm.bias.uniform_(-0.5, 0.5)
        if blk.norm.running_mean is not None:
            blk.norm.running_mean.uniform_(-1, 1)
            blk.norm.running_var.uniform_(0.5, 2)
    return blk


def _block(dims: int, cin: int, cout: int, seed: int = 0, **norm_kw) -> ULiteEncoderBlock:
    torch.manual_seed(seed)
    return _with_norm(ULiteEncoderBlock(dims, cin, cout), dims, cin, **norm_kw)


def _decoder_steps(blocks, x: torch.Tensor, skip: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(output, gradient of x, gradient of skip) of each decoder block for the same inputs and output gradient."""
    results = []
    for block in blocks:
        xi, si = x.clone().requires_grad_(True), skip.clone().requires_grad_(True)
        out = block(xi, si)
        out.backward(torch.linspace(-2, 2, out.numel()).view(out.shape))
        results.append((out, xi.grad, si.grad))
    return results


def _assert_same_gradients_and_statistics(fused, stock, where) -> None:
    """Every parameter's gradient (then cleared) and the batch norm's running statistics of two twin blocks agree.
    The gradient tolerance is relative, plus an absolute part for the gradients that are zero up to rounding (a
    bias followed by the batch norm): their rounding noise, a sum of cancelling terms, scales with the block's
    largest gradient."""
    scale = max(p.grad.abs().max().item() for p in stock.parameters())
    for (name, pa), pb in zip(fused.named_parameters(), stock.parameters()):
        tol = 1e-4 * pb.grad.abs().max().item() + 1e-5 * scale + 1e-6
        assert (pa.grad - pb.grad).abs().max().item() < tol, (where, name)
        pa.grad = pb.grad = None
    for name, buf in fused.norm.named_buffers():
        other = dict(stock.norm.named_buffers())[name]
        assert torch.allclose(buf.float(), other.float(), rtol=1e-5, atol=1e-6), (where, name)


def _spy_on(monkeypatch, kernel: str, record) -> None:
    """Route the extension through a proxy that calls ``record(args)`` before each call of its function ``kernel``."""
    ext = load_extension()

    class Spy:
        def __getattr__(self, name):
            fn = getattr(ext, name)
            if name != kernel:
                return fn

            def call(*args):
                record(args)
                return fn(*args)

            return call

    monkeypatch.setattr(cpu_kernels, "load_extension", lambda *a, **k: Spy())


def _step(blk, x, gz, gs):
    xi = x.clone().requires_grad_(True)
    z, s = blk(xi)
    torch.autograd.backward([z, s], [gz, gs])
    return z, s, xi.grad


def test_the_kernels_are_on_by_default_only_where_measured(monkeypatch):
    """On by default where PyTorch runs AVX2 or AVX-512 code; elsewhere off unless ULITE_CPU_KERNELS=1; 0 turns
    them off everywhere."""
    monkeypatch.delenv("ULITE_CPU_KERNELS", raising=False)
    for capability, expected in (("AVX512", True), ("AVX2", True), ("DEFAULT", False), ("SVE256", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert cpu_kernels.kernels_enabled() is expected, capability
        monkeypatch.setenv("ULITE_CPU_KERNELS", "1")
        assert cpu_kernels.kernels_enabled()
        monkeypatch.setenv("ULITE_CPU_KERNELS", "off")
        assert not cpu_kernels.kernels_enabled()
        monkeypatch.delenv("ULITE_CPU_KERNELS")


def test_the_extension_builds_here():
    """CI machines have a C++ compiler: the kernels must build there, or every other test here compares the stock
    operators with themselves."""
    assert cpu_kernels.kernels_enabled()
    assert load_extension() is not None


@pytest.mark.parametrize(
    "dims,cin,cout,shape,norm_kw",
    [
        (2, 16, 32, (3, 16, 12, 20), {}),  # the paper's first stage (compiled channel pair)
        (2, 32, 64, (2, 32, 8, 6), {"momentum": None}),  # cumulative running average
        (3, 8, 16, (2, 8, 6, 4, 10), {}),  # the 3D bundle's first stage
        (2, 12, 20, (2, 12, 6, 8), {}),  # a channel pair without a compiled kernel: the generic loops
        (3, 6, 10, (2, 6, 4, 6, 4), {"momentum": 0.3}),
        (2, 16, 32, (2, 16, 6, 6), {"track_running_stats": False}),  # batch statistics in eval mode too
    ],
)
def test_fused_tail_matches_the_stock_operators(dims, cin, cout, shape, norm_kw):
    fused = _block(dims, cin, cout, **norm_kw)
    stock = copy.deepcopy(fused)
    stock.fused_tail = False
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    for mode, steps in (("train", 2), ("eval", 1)):
        fused.train(mode == "train")
        stock.train(mode == "train")
        for step in range(steps):
            x = (torch.randn(shape) * 2 + 1).contiguous(memory_format=fmt)
            z0 = stock(x)[0]
            gz, gs = torch.randn_like(z0), torch.randn(shape)
            if mode == "train":  # the probe call above moved the stock running stats: undo it
                stock.load_state_dict(fused.state_dict())
            za, sa, ga = _step(fused, x, gz, gs)
            zb, sb, gb = _step(stock, x, gz, gs)
            assert za.shape == zb.shape and za.is_contiguous(memory_format=fmt) and sa.is_contiguous(memory_format=fmt)
            assert (za - zb).abs().max().item() < 1e-4, (mode, step)
            assert (sa - sb).abs().max().item() < 1e-5, (mode, step)
            assert (ga - gb).abs().max().item() < 1e-4 * gb.abs().max().item() + 1e-6, (mode, step)
            # (the axial biases' gradients are zero up to rounding: batch norm cancels a per-channel shift)
            _assert_same_gradients_and_statistics(fused, stock, (mode, step))


@pytest.mark.parametrize("act", ["GELU", ("GELU", {"approximate": "tanh"}), "RELU"])
@pytest.mark.parametrize("dims,cin,cout,shape", [(2, 16, 32, (2, 16, 8, 12)), (3, 6, 10, (2, 6, 4, 6, 4))])
def test_encoder_activation_runs_inside_the_kernels_or_after_them(act, dims, cin, cout, shape, monkeypatch):
    """An exact GELU runs inside the encoder tail's kernels (forward and backward), any other activation after
    them; the block matches the stock operators either way (compiled and generic channel counts)."""
    gelu_flags = []
    _spy_on(monkeypatch, "encoder_tail_forward", lambda args: gelu_flags.append(args[-1]))
    torch.manual_seed(1)
    fused = _with_norm(ULiteEncoderBlock(dims, cin, cout, act=act), dims, cin)
    stock = copy.deepcopy(fused)
    stock.fused_tail = False
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    x = (torch.randn(shape) * 2 + 1).contiguous(memory_format=fmt)
    z0 = stock(x)[0]
    stock.load_state_dict(fused.state_dict())  # the probe call moved the stock running stats
    gz, gs = torch.randn_like(z0), torch.randn(shape)
    za, sa, ga = _step(fused, x, gz, gs)
    zb, sb, gb = _step(stock, x, gz, gs)
    assert gelu_flags == [act == "GELU"]
    assert (za - zb).abs().max().item() < 1e-4 and (sa - sb).abs().max().item() < 1e-5
    assert (ga - gb).abs().max().item() < 1e-4 * gb.abs().max().item() + 1e-6
    _assert_same_gradients_and_statistics(fused, stock, act)


@pytest.mark.parametrize("dims", [2, 3])
def test_max_pool_ties_and_gradients_go_to_the_first_voxel(dims):
    """With a zero 1x1 weight every window is a tie: the pooled value is the bias, and the gradient of the
    weight and of the input must be the stock max-pool's (which routes each value's gradient to the first
    voxel of its window in scan order)."""
    fused = _block(dims, 8, 16, seed=3)
    with torch.no_grad():
        fused.pw.weight.zero_()
    stock = copy.deepcopy(fused)
    stock.fused_tail = False
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    shape = (2, 8) + (4, 6, 8)[:dims]
    x = torch.randn(shape).contiguous(memory_format=fmt)
    gz = torch.randn((2, 16) + tuple(s // 2 for s in shape[2:]))
    gs = torch.zeros(shape)
    za, _, ga = _step(fused, x, gz, gs)
    zb, _, gb = _step(stock, x, gz, gs)
    assert (za - zb).abs().max().item() < 1e-6  # the pooled bias through the kernels' GELU (error below 1.5e-7)
    assert torch.allclose(fused.pw.weight.grad, stock.pw.weight.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-6)


def _stock_twin(net):
    """A copy of ``net`` that runs every block through the stock operators."""
    twin = copy.deepcopy(net)
    for block in list(twin.encoders) + list(twin.decoders):
        block.fused_tail = False
    for m in twin.modules():
        if isinstance(m, AxialDWConv):
            m.fused_cpu = False
    return twin


def _assert_same_network_step(net, twin, x):
    outs = []
    for m in (net, twin):
        y = m(x)
        y.square().mean().backward()
        outs.append(y)
    assert outs[0].shape == outs[1].shape and outs[0].is_contiguous()
    assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(net.named_parameters(), twin.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6 + 1e-4 * b.grad.abs().max().item()), name


@pytest.mark.parametrize("dims,cout,inside", [(2, 1, True), (3, 2, True), (2, 8, True), (3, 9, False)])
@pytest.mark.parametrize("hooked", [False, True])
def test_the_output_conv_runs_inside_the_last_decoder_kernels(dims, cout, inside, hooked, monkeypatch):
    """The network's 1x1 output conv of up to 8 channels runs inside the last decoder's 1x1 conv + GELU kernels
    (forward and backward), a wider one after them, and none while a hook watches the output conv (the hook
    must see its call); the step matches the stock operators' in every case."""
    heads = []
    _spy_on(monkeypatch, "pw_gelu_forward", lambda args: heads.append(args[3].numel() > 0))
    torch.manual_seed(0)
    cin = 3 if dims == 2 else 1
    net = ULite(dims, cin, cout, features=(8, 16, 32))
    twin = _stock_twin(net)
    seen = []
    if hooked:
        net.conv_out.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    x = torch.randn((2, cin) + (16,) * dims)
    _assert_same_network_step(net, twin, x)
    assert len(heads) == 2 and not heads[0]  # the two decoders (16 and 8 channels), deepest first
    assert heads[1] is (inside and not hooked)
    assert seen == ([(2, cout) + (16,) * dims] if hooked else [])


def test_a_network_step_is_the_same_with_and_without_the_fused_tail():
    """ULite 2D (paper widths: the first three encoders, the last three decoders and the axial blocks of up to 64
    channels fused) and 3D: same output, same gradients for every parameter, against the stock operators."""
    for dims in (2, 3):
        # seeded before the network is built: how far the two roundings drift apart depends on the weights (with the
        # weights that other tests' random draws left, the 3D network's first encoder differed by up to 9x the
        # tolerance, before the fused output conv as after it)
        torch.manual_seed(0)
        net = ULite(2, 3, 1, features=(16, 32, 64, 128)) if dims == 2 else ULite(3, 1, 2, features=(8, 16, 32))
        x = torch.randn((2, net.in_channels) + (32,) * net.spatial_dims)
        _assert_same_network_step(net, _stock_twin(net), x)


def test_inputs_the_kernels_leave_to_the_stock_operators(monkeypatch):
    """encoder_tail returns None (the caller runs the stock operators) for NCHW inputs, too many channels, float64,
    autocast, a norm that is not BatchNorm, and when turned off with ULITE_CPU_KERNELS=0."""
    blk = _block(2, 16, 32)
    x = torch.randn(2, 16, 8, 8)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert encoder_tail(blk.norm, blk.pw, cl) is not None
    assert encoder_tail(blk.norm, blk.pw, x) is None  # NCHW
    assert encoder_tail(blk.norm.double(), blk.pw.double(), cl.double()) is None
    blk = _block(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert encoder_tail(blk.norm, blk.pw, cl) is None
    wide = _block(2, 128, 256)
    wide_x = torch.randn(2, 128, 4, 4).contiguous(memory_format=torch.channels_last)
    assert encoder_tail(wide.norm, wide.pw, wide_x) is None
    assert encoder_tail(torch.nn.InstanceNorm2d(16, affine=True), blk.pw, cl) is None
    monkeypatch.setenv("ULITE_CPU_KERNELS", "0")
    assert encoder_tail(blk.norm, blk.pw, cl) is None
    assert load_extension() is None


def test_metatensor_batches_keep_their_type_through_the_fused_tail():
    from monai.data import MetaTensor

    blk = _block(2, 16, 32)
    x = MetaTensor(torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last),
                   meta={"filename_or_obj": "case.nii.gz"})
    z, s = blk(x)
    assert isinstance(z, MetaTensor) and isinstance(s, MetaTensor)
    assert s.meta["filename_or_obj"] == "case.nii.gz"


@pytest.mark.parametrize("dims,channels,coarse", [(2, 16, (2, 32, 6, 10)), (3, 8, (2, 16, 4, 2, 6)),
                                                  (2, 64, (2, 128, 2, 4)), (2, 32, (3, 64, 4, 4))])
def test_fused_decoder_tail_matches_the_stock_operators(dims, channels, coarse):
    torch.manual_seed(1)
    fused = ULiteDecoderBlock(dims, 2 * channels, channels)
    stock = copy.deepcopy(fused)
    stock.fused_tail = False
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    x = (torch.randn(coarse) * 3).contiguous(memory_format=fmt)
    skip = torch.randn((coarse[0], channels) + tuple(2 * s for s in coarse[2:])).contiguous(memory_format=fmt)
    (oa, xa, sa), (ob, xb, sb) = _decoder_steps((fused, stock), x, skip)
    assert oa.is_contiguous(memory_format=fmt)
    assert (oa - ob).abs().max().item() < 2e-6
    assert (xa - xb).abs().max().item() < 1e-5 * xb.abs().max().item() + 1e-6
    assert (sa - sb).abs().max().item() < 1e-5 * sb.abs().max().item() + 1e-6
    for (name, pa), pb in zip(fused.named_parameters(), stock.parameters()):
        # (pw.bias's gradient is zero up to rounding: batch norm follows that conv)
        assert (pa.grad - pb.grad).abs().max().item() < 1e-4 * pb.grad.abs().max().item() + 1e-4, name


def _decoder(dims: int, channels: int, seed: int = 0, **norm_kw) -> ULiteDecoderBlock:
    torch.manual_seed(seed)
    return _with_norm(ULiteDecoderBlock(dims, 2 * channels, channels), dims, channels, **norm_kw)


def _entry_inputs(block: ULiteDecoderBlock, x: torch.Tensor, skip: torch.Tensor):
    n_up = block.pw.in_channels - block.pw.out_channels
    lo = F.conv2d(x, block.pw.weight[:, :n_up], block.pw.bias) if x.dim() == 4 else \
        F.conv3d(x, block.pw.weight[:, :n_up], block.pw.bias)
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return lo.contiguous(memory_format=fmt), skip, block.pw.weight[:, n_up:]


@pytest.mark.parametrize(
    "dims,channels,coarse,norm_kw",
    [
        (2, 16, (2, 32, 6, 10), {}),  # the paper's last decoder
        (2, 32, (3, 64, 4, 3), {"momentum": None}),  # cumulative running average, odd coarse width
        (2, 64, (1, 128, 2, 4), {}),
        (2, 8, (2, 16, 5, 5), {"momentum": 0.3}),
        (3, 8, (2, 16, 3, 2, 4), {}),  # the 3D bundle's last decoder
        (3, 16, (1, 32, 1, 3, 2), {}),  # a depth of 2: one coarse plane
        (3, 32, (2, 64, 2, 2, 2), {"track_running_stats": False}),  # batch statistics in eval mode too
    ],
)
def test_fused_decoder_entry_matches_the_stock_operators(dims, channels, coarse, norm_kw):
    """The decoder's up-sampling add, the skip's half of its 1x1 conv and its batch norm through the fused kernels:
    outputs, input and parameter gradients and running statistics as the stock operators give them, two training
    steps then one evaluation step, with inputs whose mean is far from zero (the statistics' shift)."""
    fused = _decoder(dims, channels, **norm_kw)
    stock = copy.deepcopy(fused)
    stock.fused_tail = False
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    fine = (coarse[0], channels) + tuple(2 * s for s in coarse[2:])
    for mode, steps in (("train", 2), ("eval", 1)):
        fused.train(mode == "train")
        stock.train(mode == "train")
        for step in range(steps):
            x = (torch.randn(coarse) * 3 + 2).contiguous(memory_format=fmt)
            skip = (torch.randn(fine) * 2 + 5).contiguous(memory_format=fmt)
            with torch.no_grad():  # the kernel path must be the one taken (not the stock operators twice)
                probe = copy.deepcopy(fused)
                assert decoder_entry(probe.norm, *_entry_inputs(probe, x, skip)) is not None
            (oa, xa, sa), (ob, xb, sb) = _decoder_steps((fused, stock), x, skip)
            assert oa.is_contiguous(memory_format=fmt)
            assert (oa - ob).abs().max().item() < 1e-4, (mode, step)
            assert (xa - xb).abs().max().item() < 1e-4 * xb.abs().max().item() + 1e-6, (mode, step)
            assert (sa - sb).abs().max().item() < 1e-4 * sb.abs().max().item() + 1e-6, (mode, step)
            # (pw.bias's gradient is zero up to rounding in training: batch norm follows that conv)
            _assert_same_gradients_and_statistics(fused, stock, (mode, step))


def test_decoder_entry_leaves_other_inputs_to_the_stock_operators(monkeypatch):
    """decoder_entry returns None (the caller runs the stock operators) for NCHW inputs, channel counts without a
    compiled kernel, float64, autocast, a norm other than BatchNorm, a coarse input of the wrong size, and with the
    kernels turned off; a MetaTensor skip gives a MetaTensor."""
    from monai.data import MetaTensor

    blk = _decoder(2, 16)
    x = torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    skip = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    lo, sk, w = _entry_inputs(blk, x, skip)
    assert decoder_entry(blk.norm, lo, sk, w) is not None
    assert decoder_entry(blk.norm, lo.contiguous(), sk.contiguous(), w) is None  # NCHW
    assert decoder_entry(blk.norm, lo.double(), sk.double(), w.double()) is None
    assert decoder_entry(blk.norm, lo[:, :, :3], sk, w) is None  # not half the skip's size
    assert decoder_entry(torch.nn.InstanceNorm2d(16, affine=True), lo, sk, w) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert decoder_entry(blk.norm, lo, sk, w) is None
    odd = _decoder(2, 12)
    lo12, sk12, w12 = _entry_inputs(odd, torch.randn(2, 24, 4, 4).contiguous(memory_format=torch.channels_last),
                                    torch.randn(2, 12, 8, 8).contiguous(memory_format=torch.channels_last))
    assert decoder_entry(odd.norm, lo12, sk12, w12) is None  # no compiled kernel for 12 channels
    meta = MetaTensor(sk, meta={"filename_or_obj": "case.nii.gz"})
    out = decoder_entry(blk.norm, lo, meta, w)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "case.nii.gz"
    monkeypatch.setenv("ULITE_CPU_KERNELS", "0")
    assert decoder_entry(blk.norm, lo, sk, w) is None


def test_the_kernels_flush_subnormals_inside_only():
    """The kernels treat subnormal floats as zero (a GELU tail of subnormals costs a microcode assist per value);
    the thread that called them gets its own floating-point mode back, so PyTorch's subnormals still work after."""
    torch.set_flush_denormal(False)
    tiny = torch.tensor([1e-39, -3e-40])
    assert (tiny * 1.0 != 0).all()  # this machine keeps subnormals by default
    pw, act = torch.nn.Conv2d(16, 16, 1), torch.nn.GELU()
    x = (torch.randn(2, 16, 8, 8) * 30).contiguous(memory_format=torch.channels_last)  # far into the GELU tails
    out = pointwise_gelu(pw, act, x)
    assert out is not None and torch.isfinite(out).all()
    assert (out - act(pw(x))).abs().max().item() < 1e-4 * out.abs().max().item()
    eye = torch.nn.Conv2d(8, 8, 1)
    with torch.no_grad():
        eye.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
        eye.bias.zero_()
    # the kernel's GELU tail, x * Phi(x) without cancellation, is a normal float at -12 (about -2e-32) and would be
    # a subnormal one at -13.5 (about -1e-40): flushed to zero
    tails = pointwise_gelu(eye, act, torch.tensor([-12.0, -13.5]).repeat_interleave(16).view(1, 2, 2, 8)
                           .permute(0, 3, 1, 2))
    assert tails is not None
    assert (tails[:, :, 0] < -1e-33).all() and (tails[:, :, 0] > -1e-31).all()
    assert torch.equal(tails[:, :, 1], torch.zeros_like(tails[:, :, 1]))
    assert torch.equal(tiny * 1.0, tiny)  # the calling thread keeps subnormals
    assert (torch.tensor([1e-39]) * 0.5).item() != 0


def test_fused_gelu_is_accurate_over_a_wide_range():
    """The kernel's own GELU (exp and erf on vectors) against torch's exact GELU and its gradient from -12 to 12,
    where the tails matter (x * Phi(x) must vanish smoothly, without cancellation)."""
    torch.manual_seed(0)
    pw = torch.nn.Conv2d(8, 8, 1)
    with torch.no_grad():
        pw.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
        pw.bias.zero_()
    act = torch.nn.GELU()
    x = torch.linspace(-12, 12, 8 * 2 * 25 * 25).view(2, 25, 25, 8).permute(0, 3, 1, 2)  # channels-last memory
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = pointwise_gelu(pw, act, xa)
    yb = F.gelu(xb)
    assert ya is not None
    assert (ya - yb).abs().max().item() < 2e-6
    ya.sum().backward()
    yb.sum().backward()
    assert (xa.grad - xb.grad).abs().max().item() < 2e-6


def test_pointwise_gelu_leaves_other_layers_to_the_stock_operators():
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    square, act = torch.nn.Conv2d(16, 16, 1), torch.nn.GELU()
    assert pointwise_gelu(square, act, x) is not None
    assert pointwise_gelu(square, torch.nn.GELU(approximate="tanh"), x) is None
    assert pointwise_gelu(square, torch.nn.ReLU(), x) is None
    assert pointwise_gelu(torch.nn.Conv2d(16, 8, 1), act, x) is None
    assert pointwise_gelu(square, act, x.contiguous()) is None  # NCHW
    odd = torch.randn(2, 12, 4, 4).contiguous(memory_format=torch.channels_last)
    assert pointwise_gelu(torch.nn.Conv2d(12, 12, 1), act, odd) is None  # no compiled kernel for 12 channels


@pytest.mark.parametrize("dims,channels,k,dilation,shape", [
    (2, 16, 7, 1, (2, 16, 10, 12)),  # encoder / decoder blocks
    (3, 8, 7, 1, (2, 8, 6, 8, 10)),
    (2, 32, 3, 2, (2, 32, 6, 6)),  # bottleneck branches (dilated 3-tap)
    (3, 16, 3, 3, (1, 16, 4, 6, 8)),  # dilation reaching past small sizes
    (2, 64, 7, 1, (1, 64, 4, 9)),  # fewer rows than taps, odd width
    (2, 128, 7, 1, (2, 128, 6, 7)),  # wider tensors as blocks of 64 channels (the 2D paper widths' deep stages)
    (2, 256, 7, 1, (1, 256, 5, 4)),
    (3, 128, 7, 1, (1, 128, 3, 5, 4)),
    (2, 512, 3, 2, (1, 512, 4, 4)),
])
def test_fused_axial_block_matches_the_oneDNN_convolutions(dims, channels, k, dilation, shape):
    torch.manual_seed(2)
    fused = AxialDWConv(dims, channels, k, dilation=dilation)
    with torch.no_grad():
        for conv in fused.convs:
            conv.bias.uniform_(-1, 1)
            conv.weight.mul_(3)
    stock = copy.deepcopy(fused)
    stock.fused_cpu = False
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    x = torch.randn(shape).contiguous(memory_format=fmt)
    results = []
    for block in (fused, stock):
        xi = x.clone().requires_grad_(True)
        out = block(xi)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        results.append((out, xi.grad))
    (oa, ga), (ob, gb) = results
    assert oa.is_contiguous(memory_format=fmt)
    assert (oa - ob).abs().max().item() < 1e-5
    assert (ga - gb).abs().max().item() < 1e-5
    for (name, pa), pb in zip(fused.named_parameters(), stock.parameters()):
        assert (pa.grad - pb.grad).abs().max().item() < 1e-5 * pb.grad.abs().max().item() + 1e-6, name
    with torch.no_grad():  # inference (no autograd graph) takes the kernel too
        assert (fused(x) - ob).abs().max().item() < 1e-5


def test_axial_conv_leaves_other_blocks_to_the_stock_operators():
    block = AxialDWConv(2, 16, 7)
    weights = [c.weight for c in block.convs]
    biases = [c.bias for c in block.convs]
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    assert axial_conv(x, weights, biases, [1, 1]) is not None
    assert axial_conv(x.contiguous(), weights, biases, [1, 1]) is None  # NCHW
    assert axial_conv(x, weights, biases, [1, 2]) is None  # per-axis dilations differ
    assert axial_conv(x.double(), [w.double() for w in weights], biases, [1, 1]) is None
    wide = AxialDWConv(2, 96, 7)  # neither compiled nor a multiple of the 64-channel blocks
    xw = torch.randn(1, 96, 4, 4).contiguous(memory_format=torch.channels_last)
    assert axial_conv(xw, [c.weight for c in wide.convs], [c.bias for c in wide.convs], [1, 1]) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert axial_conv(x, weights, biases, [1, 1]) is None


def test_a_second_process_reuses_the_build_whatever_ninja_its_path_finds_first(tmp_path):
    """A process of the same environment whose PATH finds another ninja first (the Label server's is activated, a
    shell's may not be) loads the cached build instead of compiling again: ninja versions cannot read each other's
    build logs, so a shared build with two ninjas was rebuilt (about 50 s) every time the other had run last."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    module = load_extension()
    assert module is not None, "the fused CPU kernels must build (g++ and ninja)"
    so = Path(module.__file__)
    log = so.parent / ".ninja_log"
    before = (so.stat().st_mtime_ns, log.read_bytes() if log.exists() else b"")
    # a decoy ninja first on PATH: any build through it fails, so a rebuild would show as a failed load too
    decoy = tmp_path / "ninja"
    decoy.write_text("#!/bin/sh\necho decoy ninja 1.0.0\nexit 1\n")
    decoy.chmod(0o755)
    for first in [str(tmp_path)] + ([os.path.dirname(shutil.which("ninja", path="/usr/bin"))]
                                    if shutil.which("ninja", path="/usr/bin") else []):
        env = dict(os.environ, PATH=first + os.pathsep + os.environ.get("PATH", ""))
        out = subprocess.run(
            [sys.executable, "-c", "from ulite_monai.networks.cpu_kernels import load_extension as f; m = f(); "
             "print(m.__file__ if m is not None else None)"],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == str(so), out.stderr[-2000:]
    assert (so.stat().st_mtime_ns, log.read_bytes() if log.exists() else b"") == before, "the build ran again"
