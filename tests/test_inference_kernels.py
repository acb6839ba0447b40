"""The fused CPU inference stages (``infer_encoder`` / ``infer_decoder`` in ``ulite_monai.networks.cpu_kernels``,
used by :class:`~ulite_monai.networks.fusion.FusedULite`) against the same fused network on PyTorch's stock operators
and the unfused ULite: 2D and 3D, the paper's and the bundle's widths, the output conv in the last decoder's pass, NaN
in the max-pool, the activations they cover, and the cases left to the stock operators."""

from __future__ import annotations

import pytest
import torch

from ulite_monai.networks import ULite, cpu_kernels, export_torchscript
from ulite_monai.networks.fusion import FusedDecoderBlock, FusedEncoderBlock, inference_network


@pytest.fixture(scope="module", autouse=True)
def _extension():
    assert cpu_kernels.load_extension() is not None, "the fused CPU kernels must build (g++ and ninja)"


def _net(dims: int, features, in_ch: int = 1, out_ch: int = 2, seed: int = 0, **kw) -> ULite:
    torch.manual_seed(seed)
    net = ULite(spatial_dims=dims, in_channels=in_ch, out_channels=out_ch, features=features, **kw)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _set_kernels(fused, on: bool) -> None:
    for m in fused.modules():
        if isinstance(m, (FusedEncoderBlock, FusedDecoderBlock)):
            m.cpu_kernel = on


class _Count:
    """Counts the calls of the inference kernels that returned a result (not None)."""

    def __init__(self, monkeypatch):
        import ulite_monai.networks.fusion as fusion

        self.encoder = self.decoder = self.head = 0
        enc, dec = fusion.infer_encoder, fusion.infer_decoder

        def counted_enc(*a, **k):
            out = enc(*a, **k)
            self.encoder += out is not None
            return out

        def counted_dec(*a, **k):
            out = dec(*a, **k)
            self.decoder += out is not None
            self.head += out is not None and (a[7] if len(a) > 7 else k.get("head")) is not None
            return out

        monkeypatch.setattr(fusion, "infer_encoder", counted_enc)
        monkeypatch.setattr(fusion, "infer_decoder", counted_dec)


CASES = [
    # dims, features, in, out, input size
    (2, (16, 32, 64, 128, 256, 512), 3, 1, (256, 256)),  # the paper's 2D network
    (2, (8, 16, 32, 64, 128), 1, 3, (96, 80)),
    (3, (8, 16, 32, 64, 128), 1, 2, (48, 64, 32)),  # the bundle's 3D widths
    (3, (16, 32, 64, 128, 256, 512), 1, 2, (64, 64, 64)),  # the paper's widths in 3D
]


@pytest.mark.parametrize("dims,features,in_ch,out_ch,size", CASES)
def test_kernels_match_stock_and_unfused(monkeypatch, dims, features, in_ch, out_ch, size):
    net = _net(dims, features, in_ch, out_ch)
    fused = inference_network(net)
    x = torch.randn((2, in_ch) + size)
    count = _Count(monkeypatch)
    with torch.inference_mode():
        ref = net(x)
        _set_kernels(fused, False)
        stock = fused(x)
        assert count.encoder == count.decoder == 0
        _set_kernels(fused, True)
        out = fused(x)
    covered = sum(f in cpu_kernels.AXIAL_CHANNELS for f in features[:-1])
    assert count.encoder == covered and count.decoder == covered and count.head == 1
    assert out.shape == ref.shape == (2, out_ch) + size and out.is_contiguous()
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, atol=2e-5 * max(1.0, scale), rtol=1e-4)
    torch.testing.assert_close(out, stock, atol=2e-5 * max(1.0, scale), rtol=1e-4)


def test_padded_odd_input_and_batch_of_one(monkeypatch):
    net = _net(3, (8, 16, 32, 64))
    fused = inference_network(net)
    x = torch.randn(1, 1, 21, 30, 17)
    count = _Count(monkeypatch)
    with torch.inference_mode():
        out = fused(x)
        ref = net(x)
    assert count.encoder == 3 and count.head == 1
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_encoder_stage_nan_spreads_as_in_the_reference_computation():
    """A NaN input voxel reaches the voxels of its axial cross (as in the reference's per-axis convs; the stock fused
    path's dense merged kernel spreads it over the whole square), and the max-pool keeps it."""
    net = _net(2, (8, 16, 32), axial_impl="reference")
    fused = inference_network(net)
    x = torch.randn(1, 8, 16, 16)
    x[0, 3, 5, 9] = float("nan")
    xl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got, _ = fused.encoders[0]._kernel_forward(xl)
        want, _ = net.encoders[0](x)
    assert torch.isnan(got).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, equal_nan=True)


def test_relu_encoders_use_the_kernel_other_decoder_activations_do_not(monkeypatch):
    net = _net(2, (8, 16, 32), act="RELU")
    fused = inference_network(net)
    assert all(e.kernel_ready for e in fused.encoders)
    assert not any(d.kernel_ready for d in fused.decoders)  # the decoder kernel computes GELU only
    x = torch.randn(2, 1, 32, 32)
    count = _Count(monkeypatch)
    with torch.inference_mode():
        out, ref = fused(x), net(x)
    assert count.encoder == 2 and count.decoder == 0
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("out_ch", [9, 40])
def test_output_conv_widths(monkeypatch, out_ch):
    """Up to 32 output channels the output conv rides in the last decoder's pass (zero-padded to vectors of 8);
    wider ones run as their own conv after it."""
    net = _net(2, (8, 16, 32), out_ch=out_ch)
    fused = inference_network(net)
    x = torch.randn(1, 1, 32, 48)
    count = _Count(monkeypatch)
    with torch.inference_mode():
        out, ref = fused(x), net(x)
    assert count.decoder == 2 and count.head == (1 if out_ch <= 32 else 0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_cases_left_to_the_stock_operators(monkeypatch):
    net = _net(3, (8, 16, 32))
    x = torch.randn(1, 1, 16, 16, 16)
    count = _Count(monkeypatch)
    with torch.inference_mode():
        ref = net(x)
        # NCHW fused network, float64, the switch off
        torch.testing.assert_close(inference_network(net, channels_last=False)(x), ref, atol=2e-5, rtol=1e-4)
        fused = inference_network(net)
        torch.testing.assert_close(fused.double()(x.double()), ref.double(), atol=2e-5, rtol=1e-4)
        monkeypatch.setenv("ULITE_CPU_KERNELS", "0")
        torch.testing.assert_close(inference_network(net)(x), ref, atol=2e-5, rtol=1e-4)
    assert count.encoder == count.decoder == 0
    # 12 channels have no compiled kernel
    assert not any(m.kernel_ready for m in inference_network(_net(2, (12, 24, 48))).modules()
                   if isinstance(m, (FusedEncoderBlock, FusedDecoderBlock)))
    # an input that asks for gradients
    fused = inference_network(net)
    xi = torch.randn(1, 8, 16, 16, 16).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    assert cpu_kernels.infer_encoder(xi, fused.encoders[0].k_taps, fused.encoders[0].k_bias, 1,
                                     fused.encoders[0].k_wt, fused.encoders[0].k_pbias, 1) is None


def test_state_dict_unchanged_and_torchscript_keeps_stock_path(tmp_path):
    net = _net(2, (8, 16, 32))
    fused = inference_network(net)
    assert not any(k.startswith("k_") or ".k_" in k for k in fused.state_dict())
    x = torch.randn(1, 1, 32, 32)
    scripted = export_torchscript(net, tmp_path / "m.ts")
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), fused(x), atol=2e-5, rtol=1e-4)


def test_metatensor_input_keeps_its_type():
    from monai.data import MetaTensor

    net = _net(2, (8, 16, 32))
    fused = inference_network(net)
    x = MetaTensor(torch.randn(1, 1, 32, 32), meta={"filename_or_obj": "case.nii.gz"})
    with torch.inference_mode():
        out = fused(x)
        _set_kernels(fused, False)
        stock = fused(x)
    assert type(out) is type(stock)
    torch.testing.assert_close(out.as_tensor(), stock.as_tensor(), atol=2e-5, rtol=1e-4)


def test_dispatch_modes_see_the_stock_operators(monkeypatch):
    """Under a TorchDispatchMode (here the FLOP counter) the opaque kernel calls would be invisible: the stock
    operators run, so the count is the same as with the kernels off."""
    from torch.utils.flop_counter import FlopCounterMode

    fused = inference_network(_net(3, (8, 16, 32)))
    x = torch.randn(1, 1, 16, 16, 16)
    counts = []
    for on in (True, False):
        _set_kernels(fused, on)
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            fused(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
