"""The bundle's sliding-window inferer (``ulite_monai.bundle.FitSlidingWindowInferer``): windows capped by the
image size rounded up to the network's divisor, otherwise MONAI's SlidingWindowInferer unchanged."""

from __future__ import annotations

import threading

import pytest
import torch
from monai.inferers import SlidingWindowInferer

from ulite_monai.bundle import Bundle, FitSlidingWindowInferer


def _recording_net(seen: list):
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    torch.manual_seed(0)
    torch.nn.init.normal_(conv.weight)

    def net(x):
        seen.append(tuple(x.shape))
        with torch.no_grad():
            return conv(x)

    return net


def test_fitted_roi_rounds_the_image_up_and_never_exceeds_roi():
    inf = FitSlidingWindowInferer(roi_size=[128, 128, 128], size_multiple=16)
    assert inf.fitted_roi((98, 77, 79)) == (112, 80, 80)
    assert inf.fitted_roi((200, 47, 128)) == (128, 48, 128)
    assert inf.fitted_roi((1, 16, 17)) == (16, 16, 32)
    assert inf.fitted_roi((0, 5, 16)) == (16, 16, 16)  # an empty axis still gets a window (0 would mean "whole axis")
    assert FitSlidingWindowInferer(roi_size=96).fitted_roi((40, 300)) == (48, 96)
    assert FitSlidingWindowInferer(roi_size=[-1, 64], size_multiple=8).fitted_roi((70, 20)) == (-1, 24)
    with pytest.raises(ValueError, match="size_multiple"):
        FitSlidingWindowInferer(roi_size=64, size_multiple=0)


@pytest.mark.parametrize("shape", [(50, 37, 61), (150, 40, 70)])
def test_output_equals_monai_inferer_with_the_fitted_window(shape):
    torch.manual_seed(1)
    x = torch.randn(1, 1, *shape)
    seen: list = []
    net = _recording_net(seen)
    fit = FitSlidingWindowInferer(roi_size=[128, 128, 128], sw_batch_size=2, overlap=0.25, mode="gaussian")
    roi = fit.fitted_roi(shape)
    out = fit(x, net)
    assert out.shape == (1, 2, *shape)
    assert {s[2:] for s in seen} == {roi}  # every window is the fitted one
    n_fit = sum(s[0] for s in seen)  # windows
    seen.clear()
    ref = SlidingWindowInferer(roi_size=roi, sw_batch_size=2, overlap=0.25, mode="gaussian")(x, net)
    assert sum(s[0] for s in seen) == n_fit
    torch.testing.assert_close(out, ref)
    assert fit.roi_size == [128, 128, 128]  # the instance keeps its settings for the next (other-sized) image
    if shape[0] > 128:
        assert roi[0] == 128 and n_fit > 1  # the long axis still gets windows of the full roi
    else:
        # one window: the Gaussian weights divide out, so the result is the network on the zero-padded image
        lo = [(r - s) // 2 for r, s in zip(roi, shape)]  # MONAI pads each axis evenly, the odd voxel at the end
        pads = [p for a in (2, 1, 0) for p in (lo[a], roi[a] - shape[a] - lo[a])]
        ref = net(torch.nn.functional.pad(x, pads))
        ref = ref[:, :, lo[0]:lo[0] + shape[0], lo[1]:lo[1] + shape[1], lo[2]:lo[2] + shape[2]]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_a_large_image_is_left_to_monai():
    x = torch.randn(1, 1, 70, 70, 70)
    seen: list = []
    net = _recording_net(seen)
    out = FitSlidingWindowInferer(roi_size=[32, 32, 32], sw_batch_size=4, overlap=0.5)(x, net)
    n = len(seen)
    seen.clear()
    torch.testing.assert_close(out, SlidingWindowInferer(roi_size=[32, 32, 32], sw_batch_size=4, overlap=0.5)(x, net))
    assert len(seen) == n and {s[2:] for s in seen} == {(32, 32, 32)}


def test_concurrent_calls_with_other_sizes_each_get_their_own_window():
    fit = FitSlidingWindowInferer(roi_size=[64, 64, 64], sw_batch_size=1)
    shapes = [(20, 30, 40), (64, 50, 33), (17, 64, 64), (90, 20, 20)]
    results: dict = {}

    def run(shape):
        seen: list = []
        out = fit(torch.ones(1, 1, *shape), _recording_net(seen))
        results[shape] = (out.shape, {s[2:] for s in seen})

    threads = [threading.Thread(target=run, args=(s,)) for s in shapes * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for shape in shapes:
        out_shape, windows = results[shape]
        assert out_shape == (1, 2, *shape)
        assert windows == {fit.fitted_roi(shape)}


def test_the_bundle_uses_it_for_inference_and_validation():
    bundle = Bundle()
    inferer = bundle.parser("inference").get_parsed_content("inferer")
    assert isinstance(inferer, FitSlidingWindowInferer)
    assert list(inferer.roi_size) == [128, 128, 128] and inferer.sw_batch_size == 2 and inferer.size_multiple == 16
    val = bundle.parser("train").get_parsed_content("validate#inferer")
    assert isinstance(val, FitSlidingWindowInferer) and list(val.roi_size) == [128, 128, 128]


def test_an_empty_crop_goes_through_as_with_monai():
    """A foreground crop that found nothing leaves an axis of size 0; MONAI's inferer pads it to a window and returns
    an empty output, and so must this one (a window of size 0 made MONAI fail on an importance map of size 0)."""
    net = _recording_net([])
    x = torch.zeros(1, 1, 0, 5, 16)
    fit = FitSlidingWindowInferer(roi_size=[128, 128, 128], sw_batch_size=2, overlap=0.25, mode="gaussian")
    out = fit(x, net)
    assert out.shape == SlidingWindowInferer(roi_size=[128] * 3, sw_batch_size=2, mode="gaussian")(x, net).shape
    assert out.shape == (1, 2, 0, 5, 16)
