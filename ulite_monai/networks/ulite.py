# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""U-Lite: a lightweight U-Net built from axial depthwise convolutions, for any number of spatial dims.

The 2D configuration with ``in_channels=3, out_channels=1`` and the default features is the network of
Dinh et al., "1M parameters are enough? A lightweight CNN-based model for medical image segmentation"
(APSIPA 2023, arXiv:2306.16103): 878,417 parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer

from ulite_monai.networks.axial import (
    axial_merged,
    axial_views,
    batch_norm,
    check_axial_impl,
    conv3d_by_planes,
    pointwise_conv,
    resolve_axial_impl,
    upsample_add,
)
from ulite_monai.networks.cpu_kernels import axial_conv, decoder_entry, encoder_tail, pointwise_gelu
from ulite_monai.networks.utils import channels_last_format, check_input, crop_to, pad_to_divisible

__all__ = ["AxialDWConv", "ULiteEncoderBlock", "ULiteDecoderBlock", "ULiteBottleneck", "ULite"]


def _axial_kernel(spatial_dims: int, axis: int, size: int, other: int = 1) -> tuple[int, ...]:
    """A tuple that is ``size`` along ``axis`` and ``other`` along every other spatial axis."""
    return tuple(size if i == axis else other for i in range(spatial_dims))


def _conv1x1(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 1x1 (x1) conv module through :func:`~ulite_monai.networks.axial.pointwise_conv`."""
    return pointwise_conv(x, conv.weight, conv.bias)


def _without_hooks(*modules: nn.Module) -> bool:
    """Whether no hook (the modules' own or global) watches these modules' calls, so that one may run inside
    another's call without anyone seeing the difference."""
    from torch.nn.modules import module as _module

    if any(getattr(_module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                      "_global_backward_hooks", "_global_backward_pre_hooks")):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in modules)


class AxialDWConv(nn.Module):
    """Axial depthwise convolution with identity: ``x + sum_axis dwconv_axis(x)``.

    One depthwise convolution per spatial axis, each with a kernel that spans ``kernel_size`` voxels
    along its axis only (e.g. 7x1 and 1x7 in 2D; 7x1x1, 1x7x1 and 1x1x7 in 3D). Outputs keep the input
    size ("same" padding). The parameters are the per-axis convolutions (``convs.0``, ``convs.1``, ...)
    whatever ``impl`` computes them with.

    Args:
        spatial_dims: number of spatial dimensions.
        channels: number of input (and output) channels.
        kernel_size: length of each axial kernel (odd).
        dilation: dilation of each axial kernel.
        impl: how the block is computed, one of ``"auto"``, ``"reference"``, ``"merged"``, ``"views"``,
            ``"triton"`` (see :mod:`ulite_monai.networks.axial`); all give the same outputs and gradients up to float
            rounding. ``"merged"`` and ``"views"`` return channels-last tensors.
    """

    def __init__(self, spatial_dims: int, channels: int, kernel_size: int = 7, dilation: int = 1,
                 impl: str = "auto") -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
        self.spatial_dims = spatial_dims
        self.impl = check_axial_impl(impl, spatial_dims)
        self.dilation = int(dilation)
        conv_type = Conv[Conv.CONV, spatial_dims]
        pad = dilation * (kernel_size - 1) // 2
        self.convs = nn.ModuleList(
            conv_type(
                channels,
                channels,
                kernel_size=_axial_kernel(spatial_dims, axis, kernel_size),
                padding=_axial_kernel(spatial_dims, axis, pad, other=0),
                dilation=dilation,
                groups=channels,
            )
            for axis in range(spatial_dims)
        )
        #: on the CPU ("merged"), run the block through the fused C++ kernel where it applies
        #: (:func:`~ulite_monai.networks.cpu_kernels.axial_conv`); False keeps the oneDNN convolutions
        self.fused_cpu = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.reference_forward(x)
        return self._forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block as the reference code computes it: one depthwise conv per axis, plus the identity."""
        out = x
        for conv in self.convs:
            out = out + conv(x)
        return out

    @torch.jit.unused
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = resolve_axial_impl(self.impl, x.device.type, self.spatial_dims)
        if impl == "reference":
            return self.reference_forward(x)
        weights = [c.weight for c in self.convs]
        biases = [c.bias for c in self.convs]
        dilations = [self.dilation] * self.spatial_dims
        if impl == "views":
            return axial_views(x, weights, biases, dilations)
        if impl == "triton":
            from ulite_monai.networks.triton_axial import axial_triton

            return axial_triton(x, weights, biases, dilations)
        if self.fused_cpu:
            out = axial_conv(x, weights, biases, dilations)
            if out is not None:
                return out
        return axial_merged(x, weights, biases, dilations, custom_backward=self.training)


class ULiteEncoderBlock(nn.Module):
    """Encoder stage: axial depthwise conv, norm (the skip), pointwise conv, max-pool 2, activation.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels (also the skip's channels).
        out_channels: output channels (after the pointwise conv).
        kernel_size: axial kernel length.
        act: activation type and arguments.
        norm: normalization type and arguments.
        axial_impl: implementation of the axial block (see :class:`AxialDWConv`); the non-reference ones
            also run the pointwise conv of a channels-last 3D batch as a 2D conv on its planes.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 7,
        act: str | tuple = "GELU",
        norm: str | tuple = "BATCH",
        axial_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.axial_impl = check_axial_impl(axial_impl, spatial_dims)
        self.dw = AxialDWConv(spatial_dims, in_channels, kernel_size, impl=axial_impl)
        self.norm = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=in_channels)
        self.pw = Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=1)
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2)
        self.act = get_act_layer(act)
        #: run norm, pointwise conv and pooling through the fused CPU kernels where they apply
        #: (:func:`~ulite_monai.networks.cpu_kernels.encoder_tail`); False keeps the stock operators
        self.fused_tail = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.jit.is_scripting():
            return self.reference_forward(x)
        return self._forward(x)

    def reference_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stage as the reference code computes it."""
        skip = self.norm(self.dw.reference_forward(x))
        return self.act(self.pool(self.pw(skip))), skip

    @torch.jit.unused
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if resolve_axial_impl(self.axial_impl, x.device.type, self.spatial_dims) == "reference":
            return self.reference_forward(x)
        y = self.dw(x)
        fused = encoder_tail(self.norm, self.pw, y, self.act) if self.fused_tail else None
        if fused is not None:
            return fused
        skip = batch_norm(self.norm, y)
        return self.act(self.pool(_conv1x1(self.pw, skip))), skip


class ULiteDecoderBlock(nn.Module):
    """Decoder stage: nearest up-sampling x2, concatenation with the skip, pointwise conv, norm,
    axial depthwise conv, pointwise conv, activation.

    The non-reference implementations compute ``pw(cat(up(x), skip))`` as ``up(pw_a(x)) + pw_b(skip)`` with
    ``pw_a``, ``pw_b`` the two halves of ``pw``'s weight (nearest up-sampling commutes with a pointwise conv):
    the same sums, the coarse half at a fraction of the voxels, no concatenated tensor.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: channels of the coarser input.
        out_channels: channels of the skip and of the output.
        kernel_size: axial kernel length.
        act: activation type and arguments.
        norm: normalization type and arguments.
        axial_impl: implementation of the axial block (see :class:`AxialDWConv`).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 7,
        act: str | tuple = "GELU",
        norm: str | tuple = "BATCH",
        axial_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.axial_impl = check_axial_impl(axial_impl, spatial_dims)
        conv_type = Conv[Conv.CONV, spatial_dims]
        self.pw = conv_type(in_channels + out_channels, out_channels, kernel_size=1)
        self.norm = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=out_channels)
        self.dw = AxialDWConv(spatial_dims, out_channels, kernel_size, impl=axial_impl)
        self.pw2 = conv_type(out_channels, out_channels, kernel_size=1)
        self.act = get_act_layer(act)
        #: run the skip's half of the first pointwise conv, the up-sampling add and the norm, and the second pointwise
        #: conv and the activation, through fused CPU kernels where they apply (:func:`~ulite_monai.networks.
        #: cpu_kernels.decoder_entry`, :func:`~ulite_monai.networks.cpu_kernels.pointwise_gelu`); False keeps the
        #: stock operators
        self.fused_tail = True

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.reference_forward(x, skip)
        return self._forward(x, skip)

    def reference_forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The stage as the reference code computes it."""
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = torch.cat([x, skip], dim=1)
        return self.act(self.pw2(self.dw.reference_forward(self.norm(self.pw(x)))))

    @torch.jit.unused
    def _forward(self, x: torch.Tensor, skip: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        """The block's output, or with ``head`` (the network's 1x1 output conv) that conv of it: on the CPU one
        kernel runs the block's last 1x1 conv, its GELU and the head, the GELU's output never stored."""
        if resolve_axial_impl(self.axial_impl, x.device.type, self.spatial_dims) == "reference":
            out = self.reference_forward(x, skip)
            return out if head is None else head(out)
        n_up = self.pw.in_channels - self.pw.out_channels  # a Python int, also under torch.compile
        w = self.pw.weight
        lo = pointwise_conv(x, w[:, :n_up], self.pw.bias)
        y = decoder_entry(self.norm, lo, skip, w[:, n_up:]) if self.fused_tail else None
        if y is None:
            y = batch_norm(self.norm, upsample_add(lo, pointwise_conv(skip, w[:, n_up:], None)))
        y = self.dw(y)
        fused = pointwise_gelu(self.pw2, self.act, y, head) if self.fused_tail else None
        if fused is not None:
            return fused
        out = self.act(_conv1x1(self.pw2, y))
        return out if head is None else _conv1x1(head, out)


class ULiteBottleneck(nn.Module):
    """Bottleneck: pointwise reduction to ``channels // 4``, then identity and three axial depthwise
    3-tap branches with dilations 1, 2, 3 concatenated, norm, pointwise expansion, activation.

    Args:
        spatial_dims: number of spatial dimensions.
        channels: input and output channels.
        dilations: dilation of each axial branch.
        act: activation type and arguments.
        norm: normalization type and arguments.
        axial_impl: implementation of the axial branches (see :class:`AxialDWConv`).
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        dilations: Sequence[int] = (1, 2, 3),
        act: str | tuple = "GELU",
        norm: str | tuple = "BATCH",
        axial_impl: str = "auto",
    ) -> None:
        super().__init__()
        conv_type = Conv[Conv.CONV, spatial_dims]
        reduced = channels // 4
        if reduced < 1:
            raise ValueError(f"bottleneck channels must be >= 4, got {channels}.")
        self.spatial_dims = spatial_dims
        self.axial_impl = check_axial_impl(axial_impl, spatial_dims)
        n_cat = reduced * (len(dilations) + 1)
        self.pw1 = conv_type(channels, reduced, kernel_size=1)
        self.branches = nn.ModuleList(
            AxialDWConv(spatial_dims, reduced, 3, dilation=d, impl=axial_impl) for d in dilations
        )
        self.norm = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=n_cat)
        self.pw2 = conv_type(n_cat, channels, kernel_size=1)
        self.act = get_act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.reference_forward(x)
        return self._forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck as the reference code computes it."""
        x = self.pw1(x)
        parts = [x]
        for branch in self.branches:
            parts.append(branch.reference_forward(x))
        x = torch.cat(parts, dim=1)
        return self.act(self.pw2(self.norm(x)))

    @torch.jit.unused
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if resolve_axial_impl(self.axial_impl, x.device.type, self.spatial_dims) == "reference":
            return self.reference_forward(x)
        x = _conv1x1(self.pw1, x)
        x = torch.cat([x] + [branch(x) for branch in self.branches], dim=1)
        return self.act(_conv1x1(self.pw2, batch_norm(self.norm, x)))


class ULite(nn.Module):
    """U-Lite segmentation network (Dinh et al., APSIPA 2023, arXiv:2306.16103), N-d.

    A stem convolution (kernel 7), ``len(features) - 1`` encoder stages of axial depthwise convolutions
    with max-pooling, a bottleneck of axial dilated depthwise branches, as many decoder stages with
    nearest up-sampling and skip concatenation, and a 1x1 output convolution.

    Inputs of any spatial size are accepted: they are padded to a multiple of ``2 ** (len(features) - 1)``
    and the output is cropped back, so the output has the input's spatial size.

    ``axial_impl`` chooses how the same parameters are computed with (the state dict is the same for every
    choice, so checkpoints move freely between them). ``"reference"`` is the reference code's computation in
    the input's memory format. ``"merged"`` and ``"views"`` (see :mod:`ulite_monai.networks.axial`) run the
    network in channels-last format, split each decoder's 1x1 conv over the concatenation into two 1x1 convs
    (see :class:`ULiteDecoderBlock`), run 1x1 convs of 3D batches as 2D convs over their planes and the 3D
    stem as a 2D conv over depth windows (:func:`~ulite_monai.networks.axial.conv3d_by_planes`); outputs and
    gradients match the reference computation up to float rounding, in training and eval mode. ``"auto"``
    (default) picks by the input's device on every call: ``"merged"`` on the CPU, ``"views"`` on CUDA and other
    devices, ``"reference"`` for 1D networks and under TorchScript. On the CPU the encoders' norm, 1x1 conv and
    pooling, the decoders' skip conv, up-sampling add and norm, their last 1x1 conv and GELU, and the axial blocks
    run through fused C++ kernels where they apply (:mod:`ulite_monai.networks.cpu_kernels`). For inference,
    :func:`~ulite_monai.networks.fuse_ulite` is faster still (BatchNorm folded).

    Args:
        spatial_dims: number of spatial dimensions (2 or 3; 1 works too).
        in_channels: number of input channels.
        out_channels: number of output channels (logits; no final activation).
        features: channels of the stem and of each encoder stage's output. The default
            ``(16, 32, 64, 128, 256, 512)`` is the paper's network (five stages).
        kernel_size: axial depthwise kernel length in encoder and decoder stages (paper: 7).
        stem_kernel_size: kernel size of the full stem convolution (paper: 7).
        bottleneck_dilations: dilations of the bottleneck's axial 3-tap branches (paper: 1, 2, 3).
        act: activation type and arguments (paper: GELU).
        norm: normalization type and arguments (paper: batch norm).
        pad_mode: how inputs whose size is not a multiple of ``2 ** stages`` are padded
            (``"constant"`` (zeros), ``"replicate"`` or ``"reflect"``).
        axial_impl: ``"auto"`` (default), ``"reference"``, ``"merged"``, ``"views"`` or ``"triton"`` (see above
            and :mod:`ulite_monai.networks.axial`; ``"triton"`` is opt-in, for CUDA).

    Example::

        net = ULite(spatial_dims=2, in_channels=3, out_channels=1)   # the paper's 878,417-parameter net
        net = ULite(spatial_dims=3, in_channels=1, out_channels=2)   # 3D, axial kernels along three axes
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        features: Sequence[int] = (16, 32, 64, 128, 256, 512),
        kernel_size: int = 7,
        stem_kernel_size: int = 7,
        bottleneck_dilations: Sequence[int] = (1, 2, 3),
        act: str | tuple = "GELU",
        norm: str | tuple = "BATCH",
        pad_mode: str = "constant",
        axial_impl: str = "auto",
    ) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        if len(features) < 2:
            raise ValueError(f"features needs at least two entries (stem + one stage), got {features}.")
        if pad_mode not in ("constant", "replicate", "reflect"):
            raise ValueError(f"pad_mode must be 'constant', 'replicate' or 'reflect', got {pad_mode!r}.")
        if stem_kernel_size % 2 != 1:
            raise ValueError(f"stem_kernel_size must be odd, got {stem_kernel_size}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.pad_mode = pad_mode
        self.axial_impl = check_axial_impl(axial_impl, spatial_dims)
        self.divisor = 2 ** (len(features) - 1)
        conv_type = Conv[Conv.CONV, spatial_dims]

        self.conv_in = conv_type(
            in_channels, features[0], kernel_size=stem_kernel_size, padding=(stem_kernel_size - 1) // 2
        )
        self.encoders = nn.ModuleList(
            ULiteEncoderBlock(spatial_dims, features[i], features[i + 1], kernel_size, act, norm, axial_impl)
            for i in range(len(features) - 1)
        )
        self.bottleneck = ULiteBottleneck(spatial_dims, features[-1], bottleneck_dilations, act, norm, axial_impl)
        self.decoders = nn.ModuleList(
            ULiteDecoderBlock(spatial_dims, features[i + 1], features[i], kernel_size, act, norm, axial_impl)
            for i in reversed(range(len(features) - 1))
        )
        self.conv_out = conv_type(features[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.reference_forward(x)
        check_input(x, self.spatial_dims, self.in_channels)
        return self._forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network as the reference code computes it (every block's ``reference_forward``), any device."""
        check_input(x, self.spatial_dims, self.in_channels)
        x, crop = pad_to_divisible(x, self.divisor, self.pad_mode)
        x = self.conv_in(x)
        skips: list[torch.Tensor] = []
        for enc in self.encoders:
            x, skip = enc.reference_forward(x)
            skips.append(skip)
        x = self.bottleneck.reference_forward(x)
        n = len(skips)
        for i, dec in enumerate(self.decoders):
            x = dec.reference_forward(x, skips[n - 1 - i])
        return crop_to(self.conv_out(x), crop)

    def implementation(self, device: torch.device | str | None = None) -> str:
        """The axial implementation this network runs on ``device`` (default: where its parameters are)."""
        if device is None:
            device = self.conv_in.weight.device
        return resolve_axial_impl(self.axial_impl, torch.device(device).type, self.spatial_dims)

    @torch.jit.unused
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(isinstance(s, torch.SymInt) for s in x.shape[2:]):
            # torch.compile with dynamic spatial sizes: inductor cannot lower the channels-last views of padded
            # symbolic sizes, so such graphs get the reference computation (static shapes get the fast one)
            return self.reference_forward(x)
        impl = resolve_axial_impl(self.axial_impl, x.device.type, self.spatial_dims)
        x, crop = pad_to_divisible(x, self.divisor, self.pad_mode)
        if impl == "reference":
            x = self.conv_in(x)
        else:
            x = x.contiguous(memory_format=channels_last_format(self.spatial_dims))
            if self.spatial_dims == 3:
                x = conv3d_by_planes(x, self.conv_in.weight, self.conv_in.bias)
            else:
                x = self.conv_in(x)
        skips: list[torch.Tensor] = []
        for enc in self.encoders:
            x, skip = enc(x)
            skips.append(skip)
        x = self.bottleneck(x)
        n = len(skips)
        for i, dec in enumerate(self.decoders):
            if i == n - 1 and impl != "reference" and _without_hooks(dec, self.conv_out):
                # the last decoder runs the output conv too (ULiteDecoderBlock._forward's head)
                return crop_to(dec._forward(x, skips[0], head=self.conv_out), crop).contiguous()
            x = dec(x, skips[n - 1 - i])
        if impl == "reference":
            return crop_to(self.conv_out(x), crop)
        if not _without_hooks(self.conv_out):
            return crop_to(self.conv_out(x), crop).contiguous()  # its hooks see the call
        return crop_to(_conv1x1(self.conv_out, x), crop).contiguous()
