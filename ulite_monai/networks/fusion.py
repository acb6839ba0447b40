# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Inference-time re-parameterisation of :class:`~ulite_monai.networks.ULite`.

:func:`fuse_ulite` returns an eval-only network that computes the same function as a trained ULite in
eval mode, with fewer and cheaper operations:

- every BatchNorm is folded into a neighbouring convolution (the one before it or the one after it);
- every axial depthwise block ``x + sum_axis conv_axis(x)`` becomes one depthwise conv whose dense kernel
  holds the identity and the axial taps (oneDNN runs square depthwise kernels far faster than 7x1 ones);
- each decoder's pointwise conv over ``cat(up(x), skip)`` is split into ``up(pw_a(x)) + pw_b(skip)``:
  nearest up-sampling commutes with a pointwise conv, so the coarse half runs at 1 / 2**d of the voxels,
  the concatenation disappears, and ``pw_b`` joins the encoder's pointwise conv on the same skip;
- the up-sampling is a broadcast inside the addition, pooling is maxima of strided views, activations
  run in place, the bottleneck's branches are one depthwise conv;
- by default the network runs in channels-last memory format (faster on CPU with oneDNN);
- on the CPU, each encoder and decoder stage of 8-64 channels runs as one pass of the fused C++ kernels
  (:func:`~ulite_monai.networks.cpu_kernels.infer_encoder`, :func:`~ulite_monai.networks.cpu_kernels.infer_decoder`;
  the last decoder's pass includes the output conv), which write only each stage's outputs to memory.

:func:`inference_network` also applies :func:`ulite_monai.utils.tune_cpu_allocator` on the CPU.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ulite_monai.networks.axial import _depth_block, conv3d_by_planes
from ulite_monai.networks.cpu_kernels import (
    AXIAL_CHANNELS,
    INFER_ACTS,
    infer_decoder,
    infer_encoder,
    inference_input_ok,
)
from ulite_monai.networks.ulite import AxialDWConv, ULite
from ulite_monai.networks.utils import check_input, crop_to, pad_to_divisible

__all__ = ["fuse_ulite", "FusedULite", "inference_network"]

WIDE_UPSAMPLE_BELOW = 64  # decoders with fewer output channels up-sample through a widened 1x1 conv


def _work_device(device: torch.device) -> torch.device:
    """Where the float64 folding arithmetic runs: the parameters' device, or the CPU for devices without
    float64 (MPS)."""
    return torch.device("cpu") if device.type == "mps" else device


def _f64(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, in float64, on its :func:`_work_device`."""
    return t.detach().to(device=_work_device(t.device), dtype=torch.float64)


def _place(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (detached) with the device and dtype of ``like`` (the source network's parameter)."""
    return t.detach().to(device=like.device, dtype=like.dtype).clone()


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and shift ``(s, t)`` with ``bn(x) == s * x + t`` per channel in eval mode."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"only BatchNorm layers can be folded, got {type(bn).__name__}.")
    if not bn.track_running_stats or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded.")
    s = torch.rsqrt(_f64(bn.running_var) + bn.eps)
    if bn.affine:
        s = s * _f64(bn.weight)
    t = -_f64(bn.running_mean) * s
    if bn.affine:
        t = t + _f64(bn.bias)
    return s, t


def _conv_like(conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor, **overrides) -> nn.Module:
    """A new conv of ``conv``'s type, geometry, device and dtype carrying ``weight`` and ``bias``."""
    kwargs = dict(
        in_channels=conv.in_channels,
        out_channels=weight.shape[0],
        kernel_size=tuple(weight.shape[2:]),
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
    )
    kwargs.update(overrides)
    new = type(conv)(**kwargs, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight.detach())
        new.bias.copy_(bias.detach())
    return new


def _bias(conv: nn.Module) -> torch.Tensor:
    if conv.bias is None:
        return torch.zeros(conv.out_channels, dtype=torch.float64, device=_work_device(conv.weight.device))
    return _f64(conv.bias)


class PointwiseConv(nn.Module):
    """A 1x1 (x1) convolution, built from a conv's geometry with optional new ``weight`` and ``bias``.

    It runs as a 1x1 convolution (on the CPU oneDNN's, faster there than a GEMM over a ``(voxels, C)`` view on
    U-Lite's 2D maps). A channels-last 3D input runs as a 2D 1x1 conv over its ``(N * D, C, H, W)`` view (the
    same memory), which oneDNN serves faster than a 1x1x1 conv3d on U-Lite's 3D shapes. The parameters get
    ``conv``'s device and dtype.
    """

    def __init__(self, conv: nn.Module, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        w = conv.weight if weight is None else weight
        if bias is None:
            bias = conv.bias if conv.bias is not None else torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
        self.spatial_dims = conv.weight.ndim - 2
        shape = (w.shape[0], w.shape[1]) + (1,) * self.spatial_dims
        self.weight = nn.Parameter(_place(w.reshape(shape), conv.weight), requires_grad=False)
        self.bias = nn.Parameter(_place(bias, conv.weight), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise(x, self.weight, self.bias, self.spatial_dims)


def pointwise(x: torch.Tensor, weight: torch.Tensor, b: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """:class:`PointwiseConv`'s computation with the given 1x1 (x1) ``weight`` and bias ``b``."""
    if spatial_dims == 2:
        return F.conv2d(x, weight, b)
    if spatial_dims == 3:
        if x.is_contiguous(memory_format=torch.channels_last_3d):
            n, c, d, h, w = x.shape
            planes = x.permute(0, 2, 3, 4, 1).reshape(n * d, h, w, c).permute(0, 3, 1, 2)
            y = F.conv2d(planes, weight.reshape(weight.shape[0], weight.shape[1], 1, 1), b)
            return y.permute(0, 2, 3, 1).reshape(n, d, h, w, y.shape[1]).permute(0, 4, 1, 2, 3)
        return F.conv3d(x, weight, b)
    return F.conv1d(x, weight, b)


def _channels_inner(x: torch.Tensor) -> bool:
    """True when the channel dim of an N-d (2D or 3D) batch has stride 1, as in a channels-last tensor or a
    channel slice of one: the fast paths below then work on ``(..., C)`` views without copies. (They are
    correct for any layout; this only picks where they are fast.)"""
    return x.dim() >= 4 and x.stride(1) == 1


class MaxPool2x(nn.Module):
    """Max-pooling by 2 along every spatial dim (even sizes), as elementwise maxima of strided views on
    channels-last tensors, or channel slices of them (several times faster than oneDNN's pooling there);
    plain max-pool otherwise."""

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims == 2 and _channels_inner(x):
            n, c, h, w = x.shape
            z = x.permute(0, 2, 3, 1).reshape(n, h // 2, 2, w // 2, 2, c)
            z = torch.maximum(z[:, :, 0], z[:, :, 1])
            return torch.maximum(z[:, :, :, 0], z[:, :, :, 1]).permute(0, 3, 1, 2)
        if self.spatial_dims == 3 and _channels_inner(x):
            n, c, d, h, w = x.shape
            z = x.permute(0, 2, 3, 4, 1).reshape(n, d // 2, 2, h // 2, 2, w // 2, 2, c)
            z = torch.maximum(z[:, :, 0], z[:, :, 1])
            z = torch.maximum(z[:, :, :, 0], z[:, :, :, 1])
            return torch.maximum(z[:, :, :, :, 0], z[:, :, :, :, 1]).permute(0, 4, 1, 2, 3)
        if self.spatial_dims == 2:
            return F.max_pool2d(x, 2)
        if self.spatial_dims == 3:
            return F.max_pool3d(x, 2)
        return F.max_pool1d(x, 2)


def merged_axial_kernel(block: AxialDWConv, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One dense depthwise kernel (float64) equal to ``scale * (x + sum_axis conv_axis(x)) + shift``.

    Each (dilated) axial kernel is embedded along its axis of a cube spanning the largest reach; the identity
    and the shift land on the centre tap and the bias. Returns ``(weight, bias, reach)``.
    """
    convs = list(block.convs)
    ch = convs[0].in_channels
    dev = _work_device(convs[0].weight.device)
    nd = convs[0].weight.ndim - 2
    s = torch.ones(ch, dtype=torch.float64, device=dev) if scale is None else scale
    t = torch.zeros(ch, dtype=torch.float64, device=dev) if shift is None else shift
    reach = max(c.dilation[a] * (c.kernel_size[a] - 1) // 2 for a, c in enumerate(convs))
    size = 2 * reach + 1
    w = torch.zeros((ch, 1) + (size,) * nd, dtype=torch.float64, device=dev)
    w[(slice(None), 0) + (reach,) * nd] += 1.0
    b = torch.zeros(ch, dtype=torch.float64, device=dev)
    for axis, conv in enumerate(convs):
        k, d = conv.kernel_size[axis], conv.dilation[axis]
        half = (k - 1) // 2
        cw = _f64(conv.weight).reshape(ch, k)
        for j in range(k):
            idx = [slice(None), 0] + [reach] * nd
            idx[2 + axis] = reach + (j - half) * d
            w[tuple(idx)] += cw[:, j]
        b += _bias(conv)
    return w * s.view((-1,) + (1,) * (nd + 1)), b * s + t, reach


class FusedAxialDW(nn.Module):
    """``scale * (x + sum_axis conv_axis(x)) + shift`` with the identity and the optional affine folded in.

    ``merge=False``: a sum of per-axis depthwise convs. ``merge=True``: one depthwise conv with a dense kernel
    holding the cross of axial taps (oneDNN's square depthwise kernels are several times faster than its 7x1
    ones). 3D blocks use :class:`PlaneDepthDW` instead (see :func:`fused_axial`).
    """

    def __init__(self, block: AxialDWConv, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                 merge: bool = False) -> None:
        super().__init__()
        convs = list(block.convs)
        nd = convs[0].weight.ndim - 2
        if merge:
            w, b, reach = merged_axial_kernel(block, scale, shift)
            size = 2 * reach + 1
            self.convs = nn.ModuleList(
                [_conv_like(convs[0], w, b, kernel_size=(size,) * nd, padding=(reach,) * nd, dilation=1)]
            )
        else:
            ch = convs[0].in_channels
            dev = _work_device(convs[0].weight.device)
            s = torch.ones(ch, dtype=torch.float64, device=dev) if scale is None else scale
            t = torch.zeros(ch, dtype=torch.float64, device=dev) if shift is None else shift
            view = (-1,) + (1,) * (nd + 1)
            fused = []
            for axis, conv in enumerate(convs):
                w = _f64(conv.weight).clone()
                b = _bias(conv)
                if axis == 0:
                    centre = (slice(None), 0) + tuple((k - 1) // 2 for k in conv.kernel_size)
                    w[centre] += 1.0
                    b = b * s + t
                else:
                    b = b * s
                fused.append(_conv_like(conv, w * s.view(view), b))
            self.convs = nn.ModuleList(fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.convs) == 1:
            return self.convs[0](x)
        out = x
        for i, conv in enumerate(self.convs):
            out = conv(x) if i == 0 else out + conv(x)
        return out


class PlaneDepthDW(nn.Module):
    """A merged 3D axial block: an in-plane depthwise conv (the H-W cross, the centre tap, the bias) plus a
    through-plane one (the D taps).

    A dense 7x7x7 kernel would do 343 multiply-adds for 19 taps. On channels-last tensors both parts run as
    2D depthwise convs over views of the same memory (``(N*D, C, H, W)`` and ``(N, C, D, H*W)``), faster than
    the dense 3D kernel. Other layouts use two conv3d.
    """

    def __init__(self, block: AxialDWConv, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
                 ) -> None:
        super().__init__()
        w, b, reach = merged_axial_kernel(block, scale, shift)
        self.reach = reach
        w_depth = w[:, :, :, reach : reach + 1, reach : reach + 1].clone()  # (C, 1, K, 1, 1)
        w_depth[:, :, reach] = 0.0  # the centre tap is in the plane part
        # (C, 1, 1, K, K): the in-plane cross and the centre
        like = block.convs[0].weight
        self.plane_weight = nn.Parameter(_place(w[:, :, reach : reach + 1].contiguous(), like), requires_grad=False)
        self.plane_bias = nn.Parameter(_place(b, like), requires_grad=False)
        self.depth_weight = nn.Parameter(_place(w_depth, like), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.reach
        c = x.shape[1]
        if x.is_contiguous(memory_format=torch.channels_last_3d):
            n, c, d, h, w = x.shape
            planes = x.permute(0, 2, 3, 4, 1).reshape(n * d, h, w, c).permute(0, 3, 1, 2)
            out = F.conv2d(planes, self.plane_weight.squeeze(2), self.plane_bias, padding=(r, r), groups=c)
            columns = x.permute(0, 2, 3, 4, 1).reshape(n, d, h * w, c).permute(0, 3, 1, 2)
            through = F.conv2d(columns, self.depth_weight.squeeze(-1), None, padding=(r, 0), groups=c)
            out = out.permute(0, 2, 3, 1).reshape(n, d, h * w, c)
            out.add_(through.permute(0, 2, 3, 1))
            return out.reshape(n, d, h, w, c).permute(0, 4, 1, 2, 3)
        out = F.conv3d(x, self.plane_weight, self.plane_bias, padding=(0, r, r), groups=c)
        return out + F.conv3d(x, self.depth_weight, None, padding=(r, 0, 0), groups=c)


def fused_axial(block: AxialDWConv, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                merge: bool = False) -> nn.Module:
    """The fused form of an axial block: :class:`PlaneDepthDW` for merged 3D blocks, else :class:`FusedAxialDW`."""
    if merge and block.convs[0].weight.ndim == 5:
        return PlaneDepthDW(block, scale, shift)
    return FusedAxialDW(block, scale, shift, merge=merge)


def kernel_taps(block: AxialDWConv, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``scale * (x + sum_axis conv_axis(x)) + shift`` as the fused CPU inference kernels take an axial block
    (:func:`~ulite_monai.networks.cpu_kernels.infer_encoder`): float64 taps ``[A, K, C]`` (the kernels add ``x`` once,
    so the identity's remaining ``scale - 1`` rides on the last axis' centre tap), the bias ``[C]`` and the
    dilation; ``None`` for blocks the kernels do not cover (channel counts, kernel sizes)."""
    convs = list(block.convs)
    ch = convs[0].in_channels
    nd = convs[0].weight.ndim - 2
    k = convs[0].kernel_size[0]
    dil = convs[0].dilation[0]
    if not (
        nd in (2, 3)
        and ch in AXIAL_CHANNELS
        and k % 2 == 1
        and k <= 15
        and all(
            c.kernel_size[a] == k and c.dilation[a] == dil and c.weight.numel() == ch * k for a, c in enumerate(convs)
        )
    ):
        return None
    dev = _work_device(convs[0].weight.device)
    s = torch.ones(ch, dtype=torch.float64, device=dev) if scale is None else scale
    t = torch.zeros(ch, dtype=torch.float64, device=dev) if shift is None else shift
    taps = torch.stack([_f64(c.weight).reshape(ch, k) * s[:, None] for c in convs]).transpose(1, 2).contiguous()
    taps[-1, k // 2] += s - 1.0
    bias = sum(_bias(c) for c in convs) * s + t
    return taps, bias, int(dil)


def _act_code(act: "Activation") -> int | None:
    """The inference kernels' number for a block's activation, or None if they do not compute it."""
    if act.kind == 1:
        return INFER_ACTS["gelu"] if act.approximate == "none" else None
    return INFER_ACTS["relu"] if act.kind == 2 else None


class Activation(nn.Module):
    """A block's activation, applied in place when it is GELU or ReLU (its inputs are fresh intermediates
    nothing else reads), so no new tensor is allocated; any other activation module runs as it is."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.kind = 0
        self.approximate = "none"
        if type(act) is nn.GELU:
            self.kind = 1
            self.approximate = act.approximate
        elif type(act) is nn.ReLU:
            self.kind = 2
        self.act = copy.deepcopy(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == 1:
            return torch.ops.aten.gelu_(x, approximate=self.approximate)
        if self.kind == 2:
            return torch.relu_(x)
        return self.act(x)


class FusedEncoderBlock(nn.Module):
    """``act(pool(pw(bn(dw(x)))))`` with BN folded into the depthwise conv.

    ``skip_weight`` (the decoder's 1x1 weights on this skip) is stacked under the pointwise weights, so one
    convolution yields both the branch to pool and the decoder's projection of the skip, which is returned
    instead of the skip itself."""

    def __init__(self, block: nn.Module, merge: bool, skip_weight: torch.Tensor) -> None:
        super().__init__()
        s, t = _bn_affine(block.norm)
        self.dw = fused_axial(block.dw, s, t, merge=merge)
        pw = block.pw
        self.n_out = pw.out_channels
        w = _f64(pw.weight).reshape(pw.out_channels, pw.in_channels)
        w = torch.cat([w, _f64(skip_weight).reshape(-1, pw.in_channels)], 0)
        # the skip projection's bias rides on the decoder's coarse half; oneDNN adds conv biases for free,
        # which measured faster than adding the encoder's bias after pooling (one op fewer per stage)
        b = _bias(pw)
        b = torch.cat([b, torch.zeros(w.shape[0] - b.shape[0], dtype=b.dtype, device=b.device)])
        self.pw = PointwiseConv(pw, w, b)
        nd = pw.weight.ndim - 2
        self.pool = MaxPool2x(nd)
        self.act = Activation(block.act)
        # the whole stage as one CPU kernel pass (infer_encoder) where it applies; the buffers are not saved
        taps = kernel_taps(block.dw, s, t)
        ch = pw.in_channels
        code = _act_code(self.act)
        self.kernel_ready = taps is not None and code is not None and w.shape[0] == 3 * ch and self.n_out == 2 * ch
        #: run the stage through the fused CPU kernel where it applies (False: the stock operators)
        self.cpu_kernel = True
        self.k_act = code if code is not None else 0
        self.k_dil = taps[2] if taps is not None else 1
        kernel = {}
        if self.kernel_ready:
            kernel = {"k_taps": taps[0], "k_bias": taps[1], "k_wt": w.t().contiguous(), "k_pbias": b}
        for name in ("k_taps", "k_bias", "k_wt", "k_pbias"):
            self.register_buffer(name, _place(kernel[name], pw.weight) if kernel else None, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.jit.is_scripting():
            if self.kernel_ready and self.cpu_kernel:
                out = self._kernel_forward(x)
                if out is not None:
                    return out
        y = self.pw(self.dw(x))
        z = self.pool(y[:, : self.n_out])
        return self.act(z), y[:, self.n_out :]

    @torch.jit.unused
    def _kernel_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return infer_encoder(x, self.k_taps, self.k_bias, self.k_dil, self.k_wt, self.k_pbias, self.k_act)


class FusedDecoderBlock(nn.Module):
    """``act(pw2(dw(bn(pw(cat(up(x), skip))))))`` as ``act(pw2(dw(up(pw_a(x)) + pw_b(skip))))``.

    ``pw_b(skip)`` arrives precomputed from the encoder (see :class:`FusedEncoderBlock`), which gets its
    weights from :meth:`skip_weight`. On channels-last tensors ``pw_a`` runs with its output channels repeated twice,
    so its result laid out in memory is already up-sampled along the last axis, and the up-sampling along the other
    axes is a broadcast inside the addition.
    """

    def __init__(self, block: nn.Module, merge: bool) -> None:
        super().__init__()
        pw = block.pw
        w, b = self._folded_pw(block)
        n_up = pw.in_channels - pw.out_channels
        self.spatial_dims = pw.weight.ndim - 2
        # the merged bias rides on the coarse half (added before up-sampling, at 1 / 2**d of the voxels)
        # few channels: repeat pw_a's outputs so the addition's inner loop runs over (width x channels), not
        # over a handful of channels; many channels: plain pw_a (half the multiply-adds)
        self.wide = pw.out_channels < WIDE_UPSAMPLE_BELOW
        if self.wide:
            self.pw_up = PointwiseConv(pw, torch.cat([w[:, :n_up]] * 2, 0), torch.cat([b, b]))
        else:
            self.pw_up = PointwiseConv(pw, w[:, :n_up], b)
        self.dw = fused_axial(block.dw, merge=merge)
        self.pw2 = PointwiseConv(block.pw2)
        self.act = Activation(block.act)
        # the whole stage as one CPU kernel pass (infer_decoder) where it applies; the buffers are not saved
        ch = pw.out_channels
        taps = kernel_taps(block.dw)
        self.kernel_ready = (
            taps is not None and _act_code(self.act) == INFER_ACTS["gelu"] and block.pw2.weight.shape[:2] == (ch, ch)
        )
        #: run the stage through the fused CPU kernel where it applies (False: the stock operators)
        self.cpu_kernel = True
        self.k_dil = taps[2] if taps is not None else 1
        # the coarse input's projection is pw_up's first ch output channels (all of them unless widened)
        kernel = {}
        if self.kernel_ready:
            w2t = _f64(block.pw2.weight).reshape(ch, ch).t().contiguous()
            kernel = {"k_taps": taps[0], "k_bias": taps[1], "k_w2t": w2t, "k_b2": _bias(block.pw2)}
        for name in ("k_taps", "k_bias", "k_w2t", "k_b2"):
            self.register_buffer(name, _place(kernel[name], pw.weight) if kernel else None, persistent=False)

    @staticmethod
    def _folded_pw(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``block.pw`` with the following BatchNorm folded in: weights over ``cat(up(x), skip)`` and bias."""
        s, t = _bn_affine(block.norm)
        pw = block.pw
        return _f64(pw.weight) * s.view((-1,) + (1,) * (pw.weight.ndim - 1)), _bias(pw) * s + t

    @staticmethod
    def skip_weight(block: nn.Module) -> torch.Tensor:
        """The BN-folded 1x1 weights that ``block`` applies to its skip input (computed by the encoder)."""
        w, _ = FusedDecoderBlock._folded_pw(block)
        return w[:, block.pw.in_channels - block.pw.out_channels :]

    def up_add(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``nearest_upsample_x2(pw_a(x)) + skip`` (``skip`` already projected), one broadcast addition on
        channels-last tensors."""
        lo = self.pw_up(x)
        if self.spatial_dims == 2 and _channels_inner(skip) and _channels_inner(lo):
            n, c, h, w = skip.shape
            if self.wide:
                lo = lo.permute(0, 2, 3, 1).reshape(n, h // 2, 1, w, c)
                hi = skip.permute(0, 2, 3, 1).reshape(n, h // 2, 2, w, c)
            else:
                lo = lo.permute(0, 2, 3, 1).reshape(n, h // 2, 1, w // 2, 1, c)
                hi = skip.permute(0, 2, 3, 1).reshape(n, h // 2, 2, w // 2, 2, c)
            return (hi + lo).reshape(n, h, w, c).permute(0, 3, 1, 2)
        if self.spatial_dims == 3 and _channels_inner(skip) and _channels_inner(lo):
            n, c, d, h, w = skip.shape
            if self.wide:
                lo = lo.permute(0, 2, 3, 4, 1).reshape(n, d // 2, 1, h // 2, 1, w, c)
                hi = skip.permute(0, 2, 3, 4, 1).reshape(n, d // 2, 2, h // 2, 2, w, c)
            else:
                lo = lo.permute(0, 2, 3, 4, 1).reshape(n, d // 2, 1, h // 2, 1, w // 2, 1, c)
                hi = skip.permute(0, 2, 3, 4, 1).reshape(n, d // 2, 2, h // 2, 2, w // 2, 2, c)
            return (hi + lo).reshape(n, d, h, w, c).permute(0, 4, 1, 2, 3)
        if self.wide:
            lo = lo[:, : skip.shape[1]]  # both halves of the widened output are equal
        return F.interpolate(lo, scale_factor=2.0, mode="nearest") + skip

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.kernel_ready and self.cpu_kernel:
                out = self.kernel_forward(x, skip)
                if out is not None:
                    return out
        return self.act(self.pw2(self.dw(self.up_add(x, skip))))

    @torch.jit.unused
    def kernel_forward(self, x: torch.Tensor, skip: torch.Tensor,
                       head: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor | None:
        """The stage through :func:`~ulite_monai.networks.cpu_kernels.infer_decoder` (with the network's output conv
        ``head`` if given), or None where the kernel does not apply."""
        if not (self.kernel_ready and self.cpu_kernel and inference_input_ok(skip)):
            return None
        c = skip.shape[1]
        lo = pointwise(x, self.pw_up.weight[:c], self.pw_up.bias[:c], self.spatial_dims)
        return infer_decoder(skip, lo, self.k_taps, self.k_bias, self.k_dil, self.k_w2t, self.k_b2, head)


class FusedBottleneck(nn.Module):
    """``act(pw2(bn(cat(y, br_1(y), br_2(y), br_3(y)))))`` with ``y = pw1(x)``, BN folded into ``pw2``.

    With merged kernels the identity and the branches are one depthwise convolution over ``cat(y, y, y, y)``
    (each copy with its own kernel: identity, branch 1, 2, 3), the same channel order as the original
    concatenation. oneDNN runs plain depthwise kernels far faster than grouped ones with several outputs per
    channel, and the copies are cheap at the bottleneck's resolution.
    """

    def __init__(self, block: nn.Module, merge: bool) -> None:
        super().__init__()
        s, t = _bn_affine(block.norm)
        self.pw1 = PointwiseConv(block.pw1)
        pw2 = block.pw2
        w = _f64(pw2.weight)
        b = _bias(pw2) + w.flatten(1) @ t
        w = w * s.view((1, -1) + (1,) * (w.ndim - 2))
        self.merged = bool(merge)
        self.n_parts = len(block.branches) + 1
        if merge:
            dense = [merged_axial_kernel(br) for br in block.branches]
            conv0 = block.branches[0].convs[0]
            ch = conv0.in_channels
            nd = conv0.weight.ndim - 2
            dev = _work_device(conv0.weight.device)
            reach = max(r for _, _, r in dense)
            size = 2 * reach + 1
            kernel = torch.zeros((self.n_parts, ch) + (size,) * nd, dtype=torch.float64, device=dev)
            bias = torch.zeros((self.n_parts, ch), dtype=torch.float64, device=dev)
            kernel[(0, slice(None)) + (reach,) * nd] = 1.0
            for j, (kw, kb, r) in enumerate(dense):
                window = (j + 1, slice(None)) + (slice(reach - r, reach + r + 1),) * nd
                kernel[window] = kw[:, 0]
                bias[j + 1] = kb
            n = ch * self.n_parts
            self.parts = _conv_like(
                conv0, kernel.reshape((n, 1) + (size,) * nd), bias.reshape(-1),
                in_channels=n, out_channels=n, groups=n, kernel_size=(size,) * nd, padding=(reach,) * nd, dilation=1,
            )
            self.branches = nn.ModuleList()
        else:
            self.parts = nn.Identity()
            self.branches = nn.ModuleList(FusedAxialDW(br) for br in block.branches)
        self.pw2 = PointwiseConv(pw2, w, b)
        self.act = Activation(block.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw1(x)
        if self.merged:
            x = self.parts(torch.cat([x] * self.n_parts, dim=1))
        else:
            parts = [x]
            for br in self.branches:
                parts.append(br(x))
            x = torch.cat(parts, dim=1)
        return self.act(self.pw2(x))


class FusedULite(nn.Module):
    """Eval-only U-Lite with folded BatchNorm, merged axial blocks and split decoder convs.

    Built by :func:`fuse_ulite`; computes the same function as the source network in eval mode.
    """

    def __init__(self, net: ULite, merge_axial: bool = True, channels_last: bool = True) -> None:
        super().__init__()
        self.spatial_dims = net.spatial_dims
        self.in_channels = net.in_channels
        self.out_channels = net.out_channels
        self.divisor = net.divisor
        self.pad_mode = net.pad_mode
        self.channels_last = bool(channels_last) and net.spatial_dims in (2, 3)
        with torch.no_grad():
            self.conv_in = copy.deepcopy(net.conv_in)
            self.decoders = nn.ModuleList(FusedDecoderBlock(b, merge_axial) for b in net.decoders)
            n = len(net.encoders)
            # encoder i's skip feeds decoder n - 1 - i, whose skip-side 1x1 conv the encoder computes
            self.encoders = nn.ModuleList(
                FusedEncoderBlock(b, merge_axial, FusedDecoderBlock.skip_weight(net.decoders[n - 1 - i]))
                for i, b in enumerate(net.encoders)
            )
            self.bottleneck = FusedBottleneck(net.bottleneck, merge_axial)
            pointwise_out = max(net.conv_out.kernel_size) == 1
            self.conv_out = PointwiseConv(net.conv_out) if pointwise_out else copy.deepcopy(net.conv_out)
        # the output 1x1 conv as the last decoder's kernel takes it: weights [C, HP] zero-padded to HP columns
        self.k_head_n = int(net.out_channels)
        head_ready = isinstance(self.conv_out, PointwiseConv) and self.k_head_n <= 32
        hw = hb = None
        if head_ready:
            cw = self.conv_out.weight.detach()
            hp = -(-self.k_head_n // 8) * 8
            hw = torch.zeros(cw.shape[1], hp, dtype=cw.dtype, device=cw.device)
            hw[:, : self.k_head_n] = cw.reshape(cw.shape[0], cw.shape[1]).t()
            hb = torch.zeros(hp, dtype=cw.dtype, device=cw.device)
            hb[: self.k_head_n] = self.conv_out.bias.detach()
        self.register_buffer("k_head_w", hw, persistent=False)
        self.register_buffer("k_head_b", hb, persistent=False)
        # ULite's stem is a stride-1, "same"-padded conv: what conv3d_by_planes computes
        self.stem_depth_blocks = (
            self.spatial_dims == 3 and self.channels_last and _stem_by_planes_pays(self.conv_in.out_channels)
        )
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        if self.channels_last:
            self.to(memory_format=self._memory_format())

    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.spatial_dims == 2 else torch.channels_last_3d

    @torch.jit.unused
    def train(self, mode: bool = True) -> FusedULite:
        if mode:
            raise RuntimeError("FusedULite is for inference only; train the original ULite instead.")
        return super().train(False)

    @torch.jit.unused
    def _stem_by_planes(self, x: torch.Tensor) -> bool:
        """Whether the 3D stem runs through :func:`~ulite_monai.networks.axial.conv3d_by_planes`: channels-last 3D
        stems on the CPU where that pays (:func:`_stem_by_planes_pays`), in eager mode (traced and compiled graphs,
        e.g. the ONNX export, and scripted ones keep the plain convolution)."""
        return (
            self.stem_depth_blocks
            and x.device.type == "cpu"
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        )

    @torch.jit.unused
    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        if self._stem_by_planes(x):
            return conv3d_by_planes(x, self.conv_in.weight, self.conv_in.bias)
        return self.conv_in(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.spatial_dims, self.in_channels)
        x, crop = pad_to_divisible(x, self.divisor, self.pad_mode)
        if self.channels_last:
            if self.spatial_dims == 2:
                x = x.contiguous(memory_format=torch.channels_last)
            else:
                x = x.contiguous(memory_format=torch.channels_last_3d)
        if not torch.jit.is_scripting():
            x = self._stem(x)
        else:
            x = self.conv_in(x)
        skips: list[torch.Tensor] = []
        for enc in self.encoders:
            x, skip = enc(x)
            skips.append(skip)
        x = self.bottleneck(x)
        n = len(skips)
        head_done = False
        for i, dec in enumerate(self.decoders):
            if i == n - 1 and not torch.jit.is_scripting():
                x, head_done = self._last_decoder(dec, x, skips[0])
            else:
                x = dec(x, skips[n - 1 - i])
        if not head_done:
            x = self.conv_out(x)
        x = crop_to(x, crop)
        return x.contiguous()

    @torch.jit.unused
    def _last_decoder(self, dec: FusedDecoderBlock, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The last decoder stage, with the output conv in the same kernel pass where it applies; returns the result
        and whether the output conv is done."""
        head = None if self.k_head_w is None else (self.k_head_w, self.k_head_b, self.k_head_n)
        out = dec.kernel_forward(x, skip, head)
        if out is None:
            return dec(x, skip), False
        return out, head is not None


def _stem_by_planes_pays(out_channels: int) -> bool:
    """Whether a fused 3D stem of ``out_channels`` runs faster on this CPU as a 2D conv over depth windows
    (:func:`~ulite_monai.networks.axial.conv3d_by_planes`) than as oneDNN's 3D conv: stems of fewer than 16
    channels, computing several output depths per plane (the bundle's 8 channels: the stem alone 20-30% faster at
    2x64^3..128^3, Intel Xeon with AVX-512), and any stem on CPUs without AVX-512, where oneDNN's 3D conv with one
    input channel is slow (AMD EPYC with AVX2, 2 cores, the paper's 16-channel stem, one output depth per plane: the
    whole fused network 17% faster at 1x1x128^3, 11% at 64^3, 4% at 2x1x96^3)."""
    if _depth_block(out_channels, "cpu") > 1:
        return True
    return "AVX512" not in torch.backends.cpu.get_cpu_capability()


def fuse_ulite(net: ULite, merge_axial: bool = True, channels_last: bool = True) -> FusedULite:
    """Return an eval-mode network equivalent to ``net.eval()`` with BatchNorm folded and axial blocks merged.

    Args:
        net: a (trained) :class:`ULite` with batch norm layers. It is not modified.
        merge_axial: merge each axial depthwise block into one dense depthwise kernel (2D) or an in-plane plus
            a through-plane kernel (3D), identity included (default). False keeps one depthwise conv per axis.
        channels_last: run in channels-last memory format.

    Returns:
        a :class:`FusedULite` whose parameters and buffers all have ``net``'s device and dtype, equal to
        ``net.eval()`` up to float rounding.
    """
    if isinstance(net, FusedULite):
        return net
    if not isinstance(net, ULite):
        raise TypeError(f"fuse_ulite expects a ULite network, got {type(net).__name__}.")
    return FusedULite(net, merge_axial=merge_axial, channels_last=channels_last)


def inference_network(net: nn.Module, fuse: bool = True, channels_last: bool = True,
                      tune_allocator: bool = True) -> nn.Module:
    """The network the inference paths use: fused (default) or the original in eval mode.

    Non-ULite networks are returned in eval mode unchanged, so configs may swap in other MONAI nets.
    ``tune_allocator`` (default) applies :func:`ulite_monai.utils.tune_cpu_allocator` when the network is
    on the CPU: without it glibc returns each forward pass's memory to the kernel and the next pass
    page-faults it back, which costs more than the network itself at 256x256.
    """
    if tune_allocator and all(p.device.type == "cpu" for p in net.parameters()):
        from ulite_monai.utils import tune_cpu_allocator

        tune_cpu_allocator()
    if fuse and isinstance(net, ULite):
        return fuse_ulite(net, channels_last=channels_last)
    net = net.eval()
    return net
