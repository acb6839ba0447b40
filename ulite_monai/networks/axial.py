# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Implementations of U-Lite's axial depthwise convolution ``x + sum_axis dwconv_axis(x)``.

All implementations take the same per-axis weights (``(C, 1, ..., K, ...)``, ``K`` taps along one axis) and
compute the same function; they differ in how the work is laid out for the convolution libraries:

- ``"reference"``: one depthwise convolution per axis plus the identity, in the input's memory format
  (the reference code's computation).
- ``"merged"``: the identity and the axial taps composed, on every call, into one dense depthwise kernel,
  on channels-last tensors. In 2D that is one ``KxK`` depthwise convolution; in 3D an in-plane ``KxK`` 2D
  depthwise convolution over the ``(N*D, C, H, W)`` view plus a through-plane ``Kx1`` 2D depthwise
  convolution over the ``(N, C, D, H*W)`` view of the same memory. In training a custom backward computes
  the input gradient through the dense kernel and each axial weight's gradient with a convolution of that
  axis's own ``Kx1``/``1xK`` shape, so the dense kernel's zero taps cost nothing in the backward pass and
  gradients reach the original per-axis parameters.
- ``"views"``: one 2D depthwise convolution per axis on channels-last views (3D: the in-plane axes on the
  ``(N*D, C, H, W)`` view, the through-plane axis on ``(N, C, D, H*W)``), differentiated by autograd.
  2D depthwise convolutions are the shapes that cuDNN and oneDNN serve with dedicated kernels, while 3D
  depthwise convolutions fall back to generic ones.
- ``"triton"`` (opt-in): the identity, the bias and every axis's taps in one pass of a Triton kernel, forward and
  backward (:mod:`ulite_monai.networks.triton_axial`); CUDA devices, or the CPU under ``TRITON_INTERPRET=1``.
- ``"auto"``: ``"merged"`` on the CPU, ``"views"`` on other devices (CUDA), ``"reference"`` in 1D.

On the CPU, :class:`~ulite_monai.networks.AxialDWConv` with ``"merged"`` hands blocks of 8-64 float32 channels to
the fused C++ kernel :func:`ulite_monai.networks.cpu_kernels.axial_conv` (same function, faster backward) and
uses :func:`axial_merged` for the rest.

See ``docs/benchmarks/benchmark.md`` (section "Training step") for the measurements behind these choices and
``python -m ulite_monai.bench --modes train --train-models ulite ulite-reference monai-unet`` to measure
them on your hardware.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ulite_monai.networks.utils import channels_last_format, update_running_stats

__all__ = [
    "AXIAL_IMPLS",
    "check_axial_impl",
    "resolve_axial_impl",
    "axial_dense_kernel",
    "axial_merged",
    "axial_views",
    "to_planes",
    "from_planes",
    "to_columns",
    "from_columns",
    "conv3d_by_planes",
    "upsample_add",
    "pointwise_conv",
    "batch_norm",
]

AXIAL_IMPLS = ("auto", "reference", "merged", "views", "triton")


def check_axial_impl(impl: str, spatial_dims: int) -> str:
    """Validate an ``axial_impl`` choice for a network with ``spatial_dims`` dims; returns it."""
    if impl not in AXIAL_IMPLS:
        raise ValueError(f"axial_impl must be one of {AXIAL_IMPLS}, got {impl!r}.")
    if spatial_dims not in (2, 3) and impl not in ("auto", "reference"):
        raise ValueError(f"axial_impl={impl!r} needs spatial_dims 2 or 3 (got {spatial_dims}); use 'reference'.")
    return impl


def resolve_axial_impl(impl: str, device_type: str, spatial_dims: int) -> str:
    """The implementation ``impl`` stands for on ``device_type`` (``"auto"`` resolved; see the module doc)."""
    if spatial_dims not in (2, 3):
        return "reference"
    if impl != "auto":
        return impl
    return "merged" if device_type == "cpu" else "views"


# ------------------------------------------------------------------------------------------------ views


def to_planes(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, D, H, W)`` -> ``(N*D, C, H, W)``; a view (no copy) when ``x`` is ``channels_last_3d``."""
    n, c, d, h, w = x.shape
    return x.permute(0, 2, 3, 4, 1).reshape(n * d, h, w, c).permute(0, 3, 1, 2)


def from_planes(y: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """Inverse of :func:`to_planes`: ``(N*D, C, H, W)`` -> ``(N, C, D, H, W)`` (a view for channels-last ``y``)."""
    _, c, h, w = y.shape
    return y.permute(0, 2, 3, 1).reshape(n, d, h, w, c).permute(0, 4, 1, 2, 3)


def to_columns(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, D, H, W)`` -> ``(N, C, D, H*W)``; a view (no copy) when ``x`` is ``channels_last_3d``."""
    n, c, d, h, w = x.shape
    return x.permute(0, 2, 3, 4, 1).reshape(n, d, h * w, c).permute(0, 3, 1, 2)


def from_columns(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`to_columns`: ``(N, C, D, H*W)`` -> ``(N, C, D, H, W)``."""
    n, c, d, _ = y.shape
    return y.permute(0, 2, 3, 1).reshape(n, d, h, w, c).permute(0, 4, 1, 2, 3)


# ------------------------------------------------------------------------------------------------ kernels


def axial_dense_kernel(taps: Sequence[torch.Tensor], dilations: Sequence[int], identity: bool = True
                       ) -> tuple[torch.Tensor, int]:
    """A dense depthwise kernel holding axial taps (and optionally the identity), built with differentiable ops.

    Args:
        taps: one ``(C, K_a)`` tensor per kernel axis ``a`` (``len(taps)`` axes), the taps along that axis.
        dilations: the dilation of each axis's taps.
        identity: add 1 at the centre tap (the ``x +`` of an axial block).

    Returns:
        ``(kernel, reach)``: the ``(C, 1, S, ..., S)`` kernel with ``S = 2 * reach + 1`` spanning the largest
        reach ``dilation * (K - 1) // 2``, in the dtype and on the device of ``taps``.
    """
    nd = len(taps)
    c = taps[0].shape[0]
    reach = max(int(d) * (t.shape[1] - 1) // 2 for t, d in zip(taps, dilations))
    size = 2 * reach + 1
    strides = [size ** (nd - 1 - a) for a in range(nd)]
    centre = reach * sum(strides)
    flat = torch.zeros(c, size ** nd, dtype=taps[0].dtype, device=taps[0].device)
    if identity:
        flat[:, centre] = 1.0
    for a, (t, d) in enumerate(zip(taps, dilations)):
        k = t.shape[1]
        offsets = [centre + (j - (k - 1) // 2) * int(d) * strides[a] for j in range(k)]
        index = torch.tensor(offsets, dtype=torch.long, device=t.device)
        flat = flat.index_add(1, index, t)
    return flat.reshape((c, 1) + (size,) * nd), reach


def _axis_conv_2d(w: torch.Tensor, axis: int, dilation: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """An axial weight as the 2D kernel used on the views, with its padding and dilation: ``1xK`` for the last
    axis (W), ``Kx1`` for the others (H in 2D; D on the column view and H on the plane view in 3D)."""
    nd = w.dim() - 2
    c, k = w.shape[0], w.shape[2 + axis]
    p = dilation * (k - 1) // 2
    if axis == nd - 1:
        return w.reshape(c, 1, 1, k), [0, p], [1, dilation]
    return w.reshape(c, 1, k, 1), [p, 0], [dilation, 1]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution on ``x`` runs in: the autocast dtype where autocast is on, else ``x.dtype``."""
    dev = x.device.type
    if x.dtype != torch.float64 and dev in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _autocast_off(device_type: str):
    if device_type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _merged_kernels(weights: Sequence[torch.Tensor], dilations: Sequence[int]):
    """The in-plane dense kernel (identity included) and, in 3D, the through-plane ``Kx1`` kernel."""
    c = weights[0].shape[0]
    taps = [w.reshape(c, -1) for w in weights]
    plane, reach = axial_dense_kernel(taps[-2:], dilations[-2:], identity=True)
    depth = taps[0].reshape(c, 1, -1, 1) if len(weights) == 3 else None
    return plane, reach, depth


def _merged_forward(x: torch.Tensor, bias: torch.Tensor | None, plane: torch.Tensor, reach: int,
                    depth: torch.Tensor | None, depth_dilation: int) -> torch.Tensor:
    c = x.shape[1]
    if x.dim() == 4:
        return F.conv2d(x, plane, bias, padding=reach, groups=c)
    n, _, d, h, w = x.shape
    out = from_planes(F.conv2d(to_planes(x), plane, bias, padding=reach, groups=c), n, d)
    k = depth.shape[2]
    p = depth_dilation * (k - 1) // 2
    through = F.conv2d(to_columns(x), depth, None, padding=(p, 0), dilation=(depth_dilation, 1), groups=c)
    return out + from_columns(through, h, w)


_conv_backward = torch.ops.aten.convolution_backward


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` channels-last -> ``(B*H, C, W, 1)``, a view of the same memory: the W axis as the
    first spatial axis (oneDNN computes a ``Kx1`` depthwise weight gradient several times faster than a
    ``1xK`` one on channels-last data)."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b * h, w, 1, c).permute(0, 3, 1, 2)


def _paired(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(B, C, H, W)`` channels-last -> ``(B, f*C, H, W/f)``, a view of the same memory in which ``f`` neighbours
    along W are channels, with ``f`` the largest of 1, 2, 4 that keeps ``f*C <= 16`` and divides W. A ``Kx1``
    depthwise kernel repeated ``f`` times computes on this view what it computes on ``x``; oneDNN's weight
    gradient vectorises over the channels and took half the time on the 16-channel view of an 8-channel
    4x8x96^3 batch's planes and columns."""
    b, c, h, w = x.shape
    f = 1
    while f < 4 and 2 * f * c <= 16 and w % (2 * f) == 0:
        f *= 2
    if f == 1:
        return x, 1
    return x.permute(0, 2, 3, 1).reshape(b, h, w // f, f * c).permute(0, 3, 1, 2), f


def _dw_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, padding: list[int], dilation: list[int],
                 mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _conv_backward(g, x, w, [x.shape[1]], [1, 1], padding, dilation, False, [0, 0], x.shape[1], mask)


class _MergedAxial(torch.autograd.Function):
    """``x + sum_axis dwconv_axis(x)`` through a dense kernel, with per-axis weight gradients (see module doc).

    ``x`` must be channels-last (2D) or channels_last_3d (3D). Under autocast the convolutions run in the
    autocast dtype, like ``F.conv2d`` would; gradients come back in the dtypes of the inputs.
    """

    @staticmethod
    def forward(ctx, x, bias, dilations, *weights):  # noqa: D102 - see class doc
        dtype = _compute_dtype(x)
        with _autocast_off(x.device.type):
            xc = x.to(dtype)
            wc = [w.to(dtype) for w in weights]
            bc = None if bias is None else bias.to(dtype)
            plane, reach, depth = _merged_kernels(wc, dilations)
            out = _merged_forward(xc, bc, plane, reach, depth, int(dilations[0]))
        ctx.save_for_backward(xc, plane, *wc)
        ctx.reach = reach
        ctx.dilations = tuple(int(d) for d in dilations)
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype, [w.dtype for w in weights])
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102 - see class doc
        xc, plane, *wc = ctx.saved_tensors
        nd = xc.dim() - 2
        x_dtype, b_dtype, w_dtypes = ctx.dtypes
        need = ctx.needs_input_grad
        r = ctx.reach
        gx = gb = None
        gw: list[torch.Tensor | None] = [None] * nd
        with _autocast_off(xc.device.type):
            g = grad.to(xc.dtype).contiguous(memory_format=channels_last_format(nd))
            if nd == 2:
                gp, xp = g, xc
            else:
                n, _, d, h, w = xc.shape
                gp, xp = to_planes(g), to_planes(xc)
            # input gradients as forward convolutions with the flipped kernels (stride 1, odd kernels, symmetric
            # padding): oneDNN's depthwise input-gradient kernel took 1.5 to 2x as long on 8-channel 3D batches
            if need[0]:  # through the dense in-plane kernel (identity included)
                gx = F.conv2d(gp, plane.flip(-2, -1), None, padding=r, groups=gp.shape[1])
                if nd == 3:
                    gx = from_planes(gx, n, d)
            want_b = ctx.has_bias and need[1]
            for axis in range(nd - 2, nd):  # in-plane weights: gradients of their own Kx1 / 1xK shapes
                b_here = want_b and axis == nd - 2  # the bias gradient comes with the first one
                if need[3 + axis] or b_here:
                    w2, pad, dl = _axis_conv_2d(wc[axis], axis, ctx.dilations[axis])
                    f = 1
                    if axis == nd - 1:  # along W: a Kx1 kernel on the (B*H, C, W, 1) view, the faster shape
                        gv, xv = _rows(gp), _rows(xp)
                        w2, pad, dl = w2.reshape(w2.shape[0], 1, -1, 1), pad[::-1], dl[::-1]
                    else:  # along H: few channels as more channels of a view with fewer columns
                        (gv, f), (xv, _) = _paired(gp), _paired(xp)
                    _, g_w, g_b = _dw_backward(gv, xv, w2.repeat(f, 1, 1, 1), pad, dl, [False, need[3 + axis], b_here])
                    gw[axis] = None if g_w is None else g_w.unflatten(0, (f, -1)).sum(0)
                    if b_here:
                        gb = g_b.unflatten(0, (f, -1)).sum(0).to(b_dtype)
            if nd == 3 and (need[0] or need[3]):  # through-plane taps, on the (N, C, D, H*W) view
                gc, xcol = to_columns(g), to_columns(xc)
                w2, pad, dl = _axis_conv_2d(wc[0], 0, ctx.dilations[0])
                if need[0]:
                    g_in = F.conv2d(gc, w2.flip(-2), None, padding=pad, dilation=dl, groups=gc.shape[1])
                    gx = gx + from_columns(g_in, h, w)
                if need[3]:
                    (gv, f), (xv, _) = _paired(gc), _paired(xcol)
                    g_w = _dw_backward(gv, xv, w2.repeat(f, 1, 1, 1), pad, dl, [False, True, False])[1]
                    gw[0] = g_w.unflatten(0, (f, -1)).sum(0)
        if gx is not None:
            gx = gx.to(x_dtype)
        grads_w = [None if gw[a] is None else gw[a].reshape(wc[a].shape).to(w_dtypes[a]) for a in range(nd)]
        return (gx, gb, None, *grads_w)


def axial_merged(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                 dilations: Sequence[int], custom_backward: bool = True) -> torch.Tensor:
    """``x + sum_axis dwconv_axis(x)`` as one dense depthwise kernel (2D) or in-plane plus through-plane 2D
    depthwise convs on views (3D), channels-last.

    Args:
        x: a ``(N, C, H, W)`` or ``(N, C, D, H, W)`` batch (converted to channels-last when it is not).
        weights: per-axis depthwise weights, axis ``a``'s of shape ``(C, 1, ...)`` with its taps along ``a``.
        biases: per-axis biases (or None).
        dilations: per-axis dilations.
        custom_backward: differentiate through :class:`_MergedAxial` (per-axis weight gradients). When False,
            the dense kernel is built with differentiable ops and autograd differentiates the dense conv.
    """
    nd = x.dim() - 2
    x = x.contiguous(memory_format=channels_last_format(nd))
    bias = None
    for b in biases:
        if b is not None:
            bias = b if bias is None else bias + b
    if custom_backward and torch.is_grad_enabled():
        return _MergedAxial.apply(x, bias, tuple(int(d) for d in dilations), *weights)
    plane, reach, depth = _merged_kernels([w.to(x.dtype) for w in weights], dilations)
    return _merged_forward(x, bias, plane, reach, depth, int(dilations[0]))


def axial_views(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                dilations: Sequence[int]) -> torch.Tensor:
    """``x + sum_axis dwconv_axis(x)`` with one 2D depthwise conv per axis on channels-last views (autograd).

    Arguments as in :func:`axial_merged`.
    """
    nd = x.dim() - 2
    x = x.contiguous(memory_format=channels_last_format(nd))
    c = x.shape[1]
    convs = [_axis_conv_2d(w, axis, int(d)) + (b,) for axis, (w, b, d) in enumerate(zip(weights, biases, dilations))]
    if nd == 2:
        out = x
        for w2, pad, dl, b in convs:
            out = out + F.conv2d(x, w2, b, padding=pad, dilation=dl, groups=c)
        return out
    n, _, d, h, w = x.shape
    planes = to_planes(x)
    in_plane = None
    for w2, pad, dl, b in convs[1:]:
        y = F.conv2d(planes, w2, b, padding=pad, dilation=dl, groups=c)
        in_plane = y if in_plane is None else in_plane + y
    w2, pad, dl, b = convs[0]
    through = F.conv2d(to_columns(x), w2, b, padding=pad, dilation=dl, groups=c)
    return x + from_planes(in_plane, n, d) + from_columns(through, h, w)


# ------------------------------------------------------------------------------------------------ other layers


def _depth_block(out_channels: int, device_type: str) -> int:
    """How many output depths :func:`conv3d_by_planes` computes per plane by default: on the CPU enough to give the
    2D convolution 16 output channels (at most 4), else 1."""
    if device_type != "cpu" or out_channels >= 16:
        return 1
    return max(1, min(4, 16 // out_channels))


def conv3d_by_planes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     depth_block: int | None = None) -> torch.Tensor:
    """A stride-1, "same"-padded, ungrouped 3D convolution computed as a 2D convolution over depth windows.

    Depth-shifted copies of the input become channels of a ``(N*D/r, (K_d+r-1)*C_in, H, W)`` channels-last batch
    and the kernel becomes ``(r*C_out, (K_d+r-1)*C_in, K_h, K_w)``, holding the 3D kernel ``r`` times at
    successive depth offsets (zeros elsewhere), so that each plane gives the outputs of ``r`` successive depths:
    the same sums, in the 2D convolution kernels that oneDNN and cuDNN run well (a 3D kernel with one input
    channel makes oneDNN's weight gradient slow). ``r > 1`` computes ``(K_d+r-1)/K_d`` times the products but
    gives the 2D convolution ``r`` times the output channels: oneDNN's CPU convolutions vectorise over the output
    channels, and with U-Lite's 8-channel stem ``r = 2`` (16 channels) took a 4x1x48^3 forward + backward
    from 48 to 30 ms and a 4x1x96^3 one from 443 to 314 ms (2-core Intel Xeon).
    Meant for small ``C_in`` (the stem): the copies take ``(K_d+r-1)/r`` times the input's memory.

    Args:
        x: ``(N, C_in, D, H, W)`` input.
        weight: ``(C_out, C_in, K_d, K_h, K_w)`` kernel.
        bias: ``(C_out,)`` bias or None.
        depth_block: ``r``, the output depths per plane; None: 16 output channels' worth on the CPU (at most 4),
            1 elsewhere.

    Returns a ``channels_last_3d`` ``(N, C_out, D, H, W)`` tensor.
    """
    n, c, d, h, w = x.shape
    o, _, kd, kh, kw = weight.shape
    r = _depth_block(o, x.device.type) if depth_block is None else int(depth_block)
    if r < 1:
        raise ValueError(f"depth_block must be >= 1, got {depth_block}.")
    blocks = -(-d // r)  # planes per item; the last block may run past the input's depth (cropped below)
    pd = (kd - 1) // 2
    padded = F.pad(x, (0, 0, 0, 0, pd, blocks * r - d + kd - 1 - pd))
    # channel j * C_in + c of plane i holds input channel c at depth r * i + j - pd
    windows = torch.cat([padded[:, :, j : j + r * blocks : r] for j in range(kd + r - 1)], dim=1)
    planes = to_planes(windows.contiguous(memory_format=torch.channels_last_3d))
    w2 = weight.permute(0, 2, 1, 3, 4).reshape(o, kd * c, kh, kw)
    if r > 1:  # output channel q * C_out + o: depth r * i + q, the kernel shifted by q depth offsets
        w2 = torch.cat([F.pad(w2, (0, 0, 0, 0, q * c, (r - 1 - q) * c)) for q in range(r)], dim=0)
        bias = None if bias is None else bias.repeat(r)
    y = F.conv2d(planes, w2, bias, padding=((kh - 1) // 2, (kw - 1) // 2))
    if r == 1:
        return from_planes(y.contiguous(memory_format=torch.channels_last), n, d)
    y = y.permute(0, 2, 3, 1).reshape(n, blocks, h, w, r, o).permute(0, 1, 4, 2, 3, 5).reshape(n, blocks * r, h, w, o)
    y = y.permute(0, 4, 1, 2, 3)
    if blocks * r != d:
        y = y[:, :, :d]
    return y.contiguous(memory_format=torch.channels_last_3d)


def _pair_views(low: torch.Tensor, high: torch.Tensor, repeat_last: bool
                ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int], int | None]:
    """Views for ``nearest_upsample_x2(low) + high`` by broadcasting, in the memory order of the inputs (channels
    innermost when both are stored channels-last).

    Each spatial dim of ``high`` is split into ``(size // 2, 2)`` and ``low`` has a broadcast dim of 1 there. With
    ``repeat_last`` (:func:`upsample_add` sets it on the CPU) the innermost spatial dim is the exception: ``low``
    is first repeated along it (a copy of half the output's size in 2D, a quarter in 3D), so that the addition
    runs over rows of ``W * C`` values; broadcasting that pair too leaves rows of ``C`` values, 3 times slower in
    3D with U-Lite's 8 full-resolution channels (2-core Intel Xeon, 4x8x48^3 -> 96^3 forward + backward: 104 ms
    broadcast, 63 ms repeated).

    Returns the two views, the axes of the split pairs, the memory order (a permutation of ``high``'s dims) the
    views follow, and the position in that order of the repeated innermost spatial dim (None when not repeated).
    """
    nd = high.dim() - 2
    channels_inner = low.stride(1) == 1 and high.stride(1) == 1 and nd in (2, 3)
    order = [0] + list(range(2, nd + 2)) + [1] if channels_inner else list(range(nd + 2))
    lo = low.permute(order)
    last = None
    if repeat_last:
        last = order.index(nd + 1)
        lo = lo.unsqueeze(last + 1).expand(*lo.shape[: last + 1], 2, *lo.shape[last + 1 :])
        lo = lo.reshape(*lo.shape[:last], 2 * lo.shape[last], *lo.shape[last + 2 :])
    shape_hi: list[int] = []
    shape_lo: list[int] = []
    pairs: list[int] = []
    for dim in order:
        size = high.shape[dim]
        if dim >= 2 and (last is None or dim != nd + 1):
            pairs.append(len(shape_hi) + 1)
            shape_hi += [size // 2, 2]
            shape_lo += [size // 2, 1]
        else:
            shape_hi.append(size)
            shape_lo.append(size)
    return lo.reshape(shape_lo), high.permute(order).reshape(shape_hi), pairs, order, last


class _UpsampleAdd(torch.autograd.Function):
    """``nearest_upsample_x2(low) + high`` by broadcasting; the backward sums ``low``'s gradient over each 2x
    block with slice additions (autograd's reduction over the broadcast dims is many times slower on CPU)."""

    @staticmethod
    def forward(ctx, low, high, repeat_last):  # noqa: D102 - see class doc
        lo, hi, pairs, order, last = _pair_views(low, high, repeat_last)
        out = (hi + lo).reshape([high.shape[d] for d in order])
        inverse = [order.index(d) for d in range(len(order))]
        ctx.pairs, ctx.order, ctx.inverse, ctx.last = pairs, order, inverse, last
        ctx.dtypes = (low.dtype, high.dtype)
        ctx.shape = tuple(high.shape)
        return out.permute(inverse)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102 - see class doc
        low_dtype, high_dtype = ctx.dtypes
        nd = len(ctx.shape) - 2
        last = ctx.last
        g = grad.permute(ctx.order)
        shape: list[int] = []
        for dim in ctx.order:
            size = ctx.shape[dim]
            shape += [size // 2, 2] if dim >= 2 and (last is None or dim != nd + 1) else [size]
        g = g.reshape(shape)
        for axis in reversed(ctx.pairs):  # the outer pairs first (on the CPU over rows that hold the innermost dim)
            g = g.select(axis, 0) + g.select(axis, 1)
        if last is not None:
            g = g.reshape(*g.shape[:last], g.shape[last] // 2, 2, *g.shape[last + 1 :])
            g = g.select(last + 1, 0) + g.select(last + 1, 1)
        return g.permute(ctx.inverse).to(low_dtype), grad.to(high_dtype), None


def upsample_add(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``nearest_upsample_x2(low) + high`` as one broadcast addition over views (any number of dims, ``high``'s
    spatial sizes twice ``low``'s). Channels-last inputs give a channels-last result, others a contiguous one.
    """
    for a, b in zip(low.shape[2:], high.shape[2:]):
        if 2 * a != b:
            raise ValueError(f"upsample_add needs high's spatial sizes twice low's, got {tuple(low.shape)} and "
                             f"{tuple(high.shape)}.")
    return _UpsampleAdd.apply(low, high, low.device.type == "cpu")


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 (x1) convolution; a ``channels_last_3d`` input runs as a 2D 1x1 conv over its ``(N*D, C, H, W)``
    view (the same memory), the 3D case being one that oneDNN serves better in 2D."""
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        n, _, d, _, _ = x.shape
        y = F.conv2d(to_planes(x), weight.reshape(weight.shape[0], weight.shape[1], 1, 1), bias)
        return from_planes(y, n, d)
    if x.dim() == 5:
        return F.conv3d(x, weight.reshape(weight.shape[0], weight.shape[1], 1, 1, 1), bias)
    if x.dim() == 4:
        return F.conv2d(x, weight.reshape(weight.shape[0], weight.shape[1], 1, 1), bias)
    return F.conv1d(x, weight.reshape(weight.shape[0], weight.shape[1], 1), bias)


# ------------------------------------------------------------------------------------------------ batch norm

# PyTorch's CPU batch-norm kernels for channels-last tensors vectorise over the channels; with fewer channels than
# a vector holds (U-Lite's full-resolution stages have 8 in the bundle) the training backward ran 3 to 4 times
# slower than in NCHW (forward + backward, 2-core Intel Xeon: 4x8x96^3 307-340 ms, 94-110 ms in NCHW, 91 ms
# below; 4x8x48^3 37-41 ms, 9-13 ms below), while from 16 channels on it is the fastest form. See ``batch_norm``.
_FEW_CHANNELS = 16


def _centred_products(x: torch.Tensor, mean: torch.Tensor, other: torch.Tensor | None = None,
                      rows: int = 4096) -> torch.Tensor:
    """Column sums of ``(x - mean) * other`` (``other`` defaults to ``x - mean``) over blocks of ``rows`` rows,
    so that the products stay in the CPU caches (``torch.var_mean`` over the rows of a wide matrix and a
    whole-matrix product were 3 to 10 times slower)."""
    total = torch.zeros_like(mean)
    for start in range(0, x.shape[0], rows):
        d = x[start : start + rows] - mean
        total += (d * (d if other is None else other[start : start + rows])).sum(0)
    return total


class _ChannelsLastBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of a ``(M, C)`` matrix (a channels-last tensor's memory), statistics per column.

    The matrix is read as ``(M / k, k * C)`` rows so that every elementwise pass and reduction runs over rows
    of ``k * C`` floats; the ``k`` partial statistics of each channel are then pooled.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, k):  # noqa: D102 - see class doc
        m, c = x.shape
        wide = x.view(m // k, k * c)
        mean = wide.sum(0).view(k, c).sum(0) / m
        var = _centred_products(wide, mean.repeat(k)).view(k, c).sum(0) / m
        invstd = torch.rsqrt(var + eps)
        scale = invstd * weight
        y = torch.addcmul((bias - mean * scale).repeat(k), wide, scale.repeat(k))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.k = k
        ctx.mark_non_differentiable(mean, var)
        return y.view(m, c), mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _mean, _var):  # noqa: D102 - see class doc
        x, weight, mean, invstd = ctx.saved_tensors
        k = ctx.k
        m, c = x.shape
        g = grad.contiguous().view(m // k, k * c)
        xw = x.view(m // k, k * c)
        sum_g = g.sum(0).view(k, c).sum(0)
        sum_g_xhat = _centred_products(xw, mean.repeat(k), g).view(k, c).sum(0) * invstd
        a = weight * invstd  # dx = a * (g - sum_g / M - xhat * sum_g_xhat / M) = a * g + b * x + shift
        b = -a * invstd * sum_g_xhat / m
        shift = -a * sum_g / m - b * mean
        dx = torch.addcmul(shift.repeat(k), xw, b.repeat(k)).addcmul_(g, a.repeat(k))
        return dx.view(m, c), sum_g_xhat, sum_g, None, None


def batch_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``, with a faster CPU path for a BatchNorm that normalises with batch statistics (training) a
    channels-last input of fewer than 16 channels: the same outputs, gradients and running-statistics updates
    up to float rounding, the result channels-last. Any other module or input goes to ``norm(x)``.
    """
    cls = type(norm)
    nd = x.dim() - 2
    if not (
        cls in (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and nd == (2 if cls is torch.nn.BatchNorm2d else 3)
        and 1 < x.shape[1] < _FEW_CHANNELS
        and norm.affine
        and x.is_contiguous(memory_format=channels_last_format(nd))
        and (norm.training or (norm.running_mean is None and norm.running_var is None))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    ):
        return norm(x)
    n, c = x.shape[0], x.shape[1]
    m = x.numel() // c
    if m < 2:
        return norm(x)  # nn.BatchNorm's own error for a single value per channel
    # plain-tensor alias (still on the autograd graph): a MetaTensor batch would try to split its per-item
    # metadata along the first dim of the (M, C) view
    plain = x if type(x) is torch.Tensor else x.as_subclass(torch.Tensor)
    rows = plain.permute(0, *range(2, nd + 2), 1).reshape(m, c)  # a view: the memory of a channels-last tensor
    k = max(j for j in (1, 2, 4, 8, 16) if m % j == 0 and j * c <= 128)
    y, mean, var = _ChannelsLastBatchNorm.apply(rows, norm.weight, norm.bias, norm.eps, k)
    update_running_stats(norm, mean, var, m)
    out = y.view(n, *x.shape[2:], c).permute(0, nd + 1, *range(1, nd + 1))
    if plain is x:
        return out
    from monai.data import MetaTensor

    if isinstance(x, MetaTensor):  # as nn.BatchNorm returns it: the input's metadata on the result
        result = MetaTensor(out)
        result.copy_meta_from(x)
        return result
    return out.as_subclass(type(x))
