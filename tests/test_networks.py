"""ULite network: shapes, parameter counts, reference parity, fusion, export."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ulite_monai.networks import (
    FusedULite,
    ULite,
    convert_reference_state_dict,
    export_onnx,
    export_torchscript,
    fuse_ulite,
    inference_network,
    load_reference_checkpoint,
)

FEATURES = (16, 32, 64, 128, 256, 512)


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def randomise_norms(net, seed=0):
    """Give every BatchNorm non-trivial statistics and affine parameters (as after training)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
    return net


# ---------------------------------------------------------------- shapes and counts


def test_paper_parameter_count():
    assert n_params(ULite(2, 3, 1)) == 878_417


def test_3d_parameter_count_matches_readme():
    # stated in README.md: 3D, 1 -> 2 channels, default features
    assert n_params(ULite(3, 1, 2)) == 891_042


@pytest.mark.parametrize(
    "dims,shape",
    [(2, (2, 3, 256, 256)), (2, (1, 3, 97, 131)), (2, (1, 3, 5, 7)), (3, (1, 1, 32, 48, 40)), (3, (2, 1, 17, 33, 9))],
)
def test_output_shape_any_size(dims, shape):
    in_ch = shape[1]
    net = ULite(dims, in_ch, 2, features=FEATURES if dims == 2 else (8, 16, 32, 64, 128, 256)).eval()
    with torch.no_grad():
        y = net(torch.randn(*shape))
    assert y.shape == (shape[0], 2) + shape[2:]
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("pad_mode", ["constant", "replicate", "reflect"])
def test_pad_modes(pad_mode):
    net = ULite(2, 1, 2, features=(8, 16, 32), pad_mode=pad_mode).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 3, 30)).shape == (1, 2, 3, 30)


def test_divisible_input_is_not_altered_by_padding():
    # a 64x64 input needs no padding: cropping must return exactly the unpadded computation
    net = ULite(2, 1, 1, features=(4, 8, 16)).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        a = net(x)
        b = net.conv_out(_manual_forward(net, x))
    assert torch.equal(a, b)


def _manual_forward(net, x):
    x = net.conv_in(x)
    skips = []
    for enc in net.encoders:
        x, s = enc(x)
        skips.append(s)
    x = net.bottleneck(x)
    for dec, s in zip(net.decoders, reversed(skips)):
        x = dec(x, s)
    return x


def test_bad_inputs_give_clear_errors():
    net = ULite(2, 3, 1)
    with pytest.raises(ValueError, match="3 channels|in_channels=3"):
        net(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="spatial dims"):
        net(torch.randn(1, 3, 32, 32, 32))
    with pytest.raises(ValueError, match="spatial_dims"):
        ULite(4, 1, 1)
    with pytest.raises(ValueError, match="pad_mode"):
        ULite(2, 1, 1, pad_mode="circular")


def test_3d_uses_axial_kernels_along_three_axes():
    net = ULite(3, 1, 2)
    shapes = [tuple(c.weight.shape[2:]) for c in net.encoders[0].dw.convs]
    assert shapes == [(7, 1, 1), (1, 7, 1), (1, 1, 7)]
    shapes = [tuple(c.weight.shape[2:]) for c in net.bottleneck.branches[2].convs]
    assert shapes == [(3, 1, 1), (1, 3, 1), (1, 1, 3)]
    assert [b.convs[0].dilation[0] for b in net.bottleneck.branches] == [1, 2, 3]


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for dims, shape in ((2, (2, 3, 64, 64)), (3, (2, 1, 32, 32, 32))):
        net = ULite(dims, shape[1], 2, features=(8, 16, 32, 64, 128, 256)).train()
        net(torch.randn(*shape)).square().mean().backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert missing == [], missing


def test_train_and_eval_modes_and_determinism():
    torch.manual_seed(1)
    net = ULite(2, 3, 1, features=(8, 16, 32, 64))
    x = torch.randn(2, 3, 64, 64) * 3 + 1
    net.train()
    y_train = net(x)
    assert net.encoders[0].norm.num_batches_tracked.item() == 1
    net.eval()
    with torch.no_grad():
        y1, y2 = net(x), net(x)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y_train, y1)  # batch statistics vs running statistics
    torch.manual_seed(7)
    a = ULite(2, 3, 1, features=(8, 16, 32, 64)).eval()
    torch.manual_seed(7)
    b = ULite(2, 3, 1, features=(8, 16, 32, 64)).eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_bundle_style_instantiation():
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {"network_def": {"_target_": "ulite_monai.networks.ULite", "spatial_dims": 3, "in_channels": 1,
                         "out_channels": 2, "features": [4, 8, 16, 32]}}
    )
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, ULite) and net.spatial_dims == 3


# ---------------------------------------------------------------- reference checkpoint parity


def reference_state_dict(seed=0, in_ch=3, out_ch=1, feats=FEATURES):
    """A state dict with the reference code's names and shapes (2D), random values."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()

    def conv(name, o, i, kh, kw):
        sd[f"{name}.weight"] = torch.randn(o, i, kh, kw, generator=g) * (1.0 / (i * kh * kw)) ** 0.5
        sd[f"{name}.bias"] = torch.randn(o, generator=g) * 0.1

    def bn(name, c):
        sd[f"{name}.weight"] = torch.rand(c, generator=g) + 0.5
        sd[f"{name}.bias"] = torch.rand(c, generator=g) - 0.5
        sd[f"{name}.running_mean"] = torch.rand(c, generator=g) - 0.5
        sd[f"{name}.running_var"] = torch.rand(c, generator=g) + 0.5
        sd[f"{name}.num_batches_tracked"] = torch.tensor(100)

    def axial(name, c, k):
        conv(f"{name}.dw_h", c, 1, k, 1)
        conv(f"{name}.dw_w", c, 1, 1, k)

    depth = len(feats) - 1
    conv("conv_in", feats[0], in_ch, 7, 7)
    for i in range(1, depth + 1):
        axial(f"e{i}.dw", feats[i - 1], 7)
        bn(f"e{i}.bn", feats[i - 1])
        conv(f"e{i}.pw", feats[i], feats[i - 1], 1, 1)
    gc = feats[-1] // 4
    conv(f"b{depth}.pw1", gc, feats[-1], 1, 1)
    for k in (1, 2, 3):
        axial(f"b{depth}.dw{k}", gc, 3)
    bn(f"b{depth}.bn", 4 * gc)
    conv(f"b{depth}.pw2", feats[-1], 4 * gc, 1, 1)
    for i in range(depth, 0, -1):
        conv(f"d{i}.pw", feats[i - 1], feats[i] + feats[i - 1], 1, 1)
        bn(f"d{i}.bn", feats[i - 1])
        axial(f"d{i}.dw", feats[i - 1], 7)
        conv(f"d{i}.pw2", feats[i - 1], feats[i - 1], 1, 1)
    conv("conv_out", out_ch, feats[0], 1, 1)
    return sd


def reference_forward(sd, x, depth=5):
    """The paper's computation written with functional ops straight from a reference state dict (eval)."""

    def conv(name, x, dil=1):
        return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], padding="same", dilation=dil,
                        groups=x.shape[1] if sd[f"{name}.weight"].shape[1] == 1 and x.shape[1] > 1 else 1)

    def bn(name, x):
        return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], training=False, eps=1e-5)

    def axial(name, x, dil=1):
        return x + conv(f"{name}.dw_h", x, dil) + conv(f"{name}.dw_w", x, dil)

    x = conv("conv_in", x)
    skips = []
    for i in range(1, depth + 1):
        skip = bn(f"e{i}.bn", axial(f"e{i}.dw", x))
        x = F.gelu(F.max_pool2d(conv(f"e{i}.pw", skip), 2))
        skips.append(skip)
    x = conv(f"b{depth}.pw1", x)
    x = torch.cat([x] + [axial(f"b{depth}.dw{k}", x, k) for k in (1, 2, 3)], 1)
    x = F.gelu(conv(f"b{depth}.pw2", bn(f"b{depth}.bn", x)))
    for i in range(depth, 0, -1):
        x = torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skips[i - 1]], 1)
        x = F.gelu(conv(f"d{i}.pw2", axial(f"d{i}.dw", bn(f"d{i}.bn", conv(f"d{i}.pw", x)))))
    return conv("conv_out", x)


def test_reference_names_shapes_and_order_match():
    sd = reference_state_dict()
    net = ULite(2, 3, 1)
    ours = OrderedDict((k, v.shape) for k, v in net.state_dict().items())
    converted = convert_reference_state_dict(sd)
    assert list(converted) == list(ours)  # same tensors, same order of use
    assert all(converted[k].shape == ours[k] for k in ours)
    assert sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k) == 878_417


@pytest.mark.parametrize("lightning", [False, True])
def test_reference_checkpoint_gives_identical_outputs(tmp_path, lightning):
    sd = reference_state_dict(seed=3)
    path = tmp_path / "ref.ckpt"
    if lightning:
        torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in sd.items()}}, path)
    else:
        torch.save(sd, path)
    net = load_reference_checkpoint(path).eval()
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        ours, ref = net.reference_forward(x), reference_forward(sd, x)
        fast = net(x)  # the default implementation: same sums in another order (float32 rounding)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (fast - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() * 10


def test_reference_loader_rejects_other_checkpoints(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"layer.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="reference U-Lite"):
        load_reference_checkpoint(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_reference_checkpoint(tmp_path / "junk.pt")


# ---------------------------------------------------------------- fusion


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fusion_parity_2d(merge, channels_last):
    torch.manual_seed(0)
    net = randomise_norms(ULite(2, 3, 2)).eval()
    fused = fuse_ulite(net, merge_axial=merge, channels_last=channels_last)
    assert isinstance(fused, FusedULite)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        assert rel_err(fused(x), net(x)) <= 1e-4


@pytest.mark.parametrize("channels_last", [True, False])
def test_fusion_parity_3d_and_fewer_ops(channels_last):
    torch.manual_seed(0)
    net = randomise_norms(ULite(3, 1, 2, features=(8, 16, 32, 64, 128))).eval()
    fused = fuse_ulite(net, channels_last=channels_last)
    x = torch.randn(1, 1, 40, 36, 33)
    with torch.no_grad():
        assert rel_err(fused(x), net(x)) <= 1e-4
    n_mod = lambda m: sum(1 for _ in m.modules())  # noqa: E731
    assert n_mod(fused) < n_mod(net)
    # the 8-channel stem runs as a 2D conv with 2 output depths per plane on the CPU (channels-last only);
    # scripted graphs keep the plain convolution, and so does a stem of 16 channels on CPUs with AVX-512 (on the
    # others it runs by planes too, one output depth per plane)
    assert fused._stem_by_planes(x) == channels_last
    with torch.no_grad():
        assert rel_err(torch.jit.script(fused)(x), net(x)) <= 1e-4
    wide_net = randomise_norms(ULite(3, 1, 2, features=(16, 32, 64))).eval()
    wide = fuse_ulite(wide_net, channels_last=channels_last)
    avx512 = "AVX512" in torch.backends.cpu.get_cpu_capability()
    assert wide._stem_by_planes(x) == (channels_last and not avx512)
    with torch.no_grad():
        assert rel_err(wide(x), wide_net(x)) <= 1e-4


def test_fused_is_inference_only_and_source_untouched():
    net = randomise_norms(ULite(2, 1, 1, features=(4, 8, 16))).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused = fuse_ulite(net)
    assert net.training  # not switched to eval
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(RuntimeError, match="inference only"):
        fused.train()
    assert inference_network(net, fuse=False) is net and not net.training


# ---------------------------------------------------------------- export


def test_torchscript_export_parity(tmp_path):
    net = randomise_norms(ULite(2, 3, 1)).eval()
    scripted = export_torchscript(net, tmp_path / "m.ts")
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    x = torch.randn(1, 3, 100, 90)
    with torch.no_grad():
        assert rel_err(loaded(x), net(x)) <= 1e-4
        assert rel_err(scripted(x), net(x)) <= 1e-4
    unfused = torch.jit.script(net)
    with torch.no_grad():
        assert torch.allclose(unfused(x), net(x), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dims", [2, 3])
def test_onnx_export_dynamic_axes_parity(tmp_path, dims):
    import onnx

    from ulite_monai.networks import onnx_session

    feats = FEATURES if dims == 2 else (8, 16, 32, 64, 128)
    net = randomise_norms(ULite(dims, 3 if dims == 2 else 1, 2, features=feats)).eval()
    path = export_onnx(net, tmp_path / "m.onnx")
    model = onnx.load(path)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    sess = onnx_session(path)
    shapes = [(1, net.in_channels) + (64,) * dims, (3, net.in_channels) + tuple(37 + 11 * i for i in range(dims))]
    for shape in shapes:
        x = torch.randn(*shape)
        y = sess.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            ref = net(x).numpy()
        assert y.shape == ref.shape
        assert np.abs(y - ref).max() / np.abs(ref).max() <= 1e-4


@pytest.mark.slow
def test_torch_compile_works():
    net = randomise_norms(ULite(2, 1, 2, features=(8, 16, 32, 64))).eval()
    fused = fuse_ulite(net)
    compiled = torch.compile(fused)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert rel_err(compiled(x), net(x)) <= 1e-4
    # 3D through the same class (static shapes, as the benchmark compiles it)
    net3 = randomise_norms(ULite(3, 1, 2, features=(4, 8, 16))).eval()
    compiled3 = torch.compile(fuse_ulite(net3), dynamic=False)
    x3 = torch.randn(1, 1, 24, 20, 16)
    with torch.no_grad():
        assert rel_err(compiled3(x3), net3(x3)) <= 1e-4
