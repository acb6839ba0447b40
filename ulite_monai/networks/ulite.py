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

__all__ = ["AxialDWConv", "ULiteEncoderBlock", "ULiteDecoderBlock", "ULiteBottleneck", "ULite"]


def _axial_kernel(spatial_dims: int, axis: int, size: int, other: int = 1) -> tuple[int, ...]:
    """A tuple that is ``size`` along ``axis`` and ``other`` along every other spatial axis."""
    return tuple(size if i == axis else other for i in range(spatial_dims))


class AxialDWConv(nn.Module):
    """Axial depthwise convolution with identity: ``x + sum_axis dwconv_axis(x)``.

    One depthwise convolution per spatial axis, each with a kernel that spans ``kernel_size`` voxels
    along its axis only (e.g. 7x1 and 1x7 in 2D; 7x1x1, 1x7x1 and 1x1x7 in 3D). Outputs keep the input
    size ("same" padding).

    Args:
        spatial_dims: number of spatial dimensions.
        channels: number of input (and output) channels.
        kernel_size: length of each axial kernel (odd).
        dilation: dilation of each axial kernel.
    """

    def __init__(self, spatial_dims: int, channels: int, kernel_size: int = 7, dilation: int = 1) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for conv in self.convs:
            out = out + conv(x)
        return out


class ULiteEncoderBlock(nn.Module):
    """Encoder stage: axial depthwise conv, norm (the skip), pointwise conv, max-pool 2, activation.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels (also the skip's channels).
        out_channels: output channels (after the pointwise conv).
        kernel_size: axial kernel length.
        act: activation type and arguments.
        norm: normalization type and arguments.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 7,
        act: str | tuple = "GELU",
        norm: str | tuple = "BATCH",
    ) -> None:
        super().__init__()
        self.dw = AxialDWConv(spatial_dims, in_channels, kernel_size)
        self.norm = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=in_channels)
        self.pw = Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=1)
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2)
        self.act = get_act_layer(act)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.norm(self.dw(x))
        return self.act(self.pool(self.pw(skip))), skip


class ULiteDecoderBlock(nn.Module):
    """Decoder stage: nearest up-sampling x2, concatenation with the skip, pointwise conv, norm,
    axial depthwise conv, pointwise conv, activation.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: channels of the coarser input.
        out_channels: channels of the skip and of the output.
        kernel_size: axial kernel length.
        act: activation type and arguments.
        norm: normalization type and arguments.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 7,
        act: str | tuple = "GELU",
        norm: str | tuple = "BATCH",
    ) -> None:
        super().__init__()
        conv_type = Conv[Conv.CONV, spatial_dims]
        self.pw = conv_type(in_channels + out_channels, out_channels, kernel_size=1)
        self.norm = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=out_channels)
        self.dw = AxialDWConv(spatial_dims, out_channels, kernel_size)
        self.pw2 = conv_type(out_channels, out_channels, kernel_size=1)
        self.act = get_act_layer(act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = torch.cat([x, skip], dim=1)
        return self.act(self.pw2(self.dw(self.norm(self.pw(x)))))


class ULiteBottleneck(nn.Module):
    """Bottleneck: pointwise reduction to ``channels // 4``, then identity and three axial depthwise
    3-tap branches with dilations 1, 2, 3 concatenated, norm, pointwise expansion, activation.

    Args:
        spatial_dims: number of spatial dimensions.
        channels: input and output channels.
        dilations: dilation of each axial branch.
        act: activation type and arguments.
        norm: normalization type and arguments.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        dilations: Sequence[int] = (1, 2, 3),
        act: str | tuple = "GELU",
        norm: str | tuple = "BATCH",
    ) -> None:
        super().__init__()
        conv_type = Conv[Conv.CONV, spatial_dims]
        reduced = channels // 4
        if reduced < 1:
            raise ValueError(f"bottleneck channels must be >= 4, got {channels}.")
        n_cat = reduced * (len(dilations) + 1)
        self.pw1 = conv_type(channels, reduced, kernel_size=1)
        self.branches = nn.ModuleList(AxialDWConv(spatial_dims, reduced, 3, dilation=d) for d in dilations)
        self.norm = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=n_cat)
        self.pw2 = conv_type(n_cat, channels, kernel_size=1)
        self.act = get_act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw1(x)
        parts = [x]
        for branch in self.branches:
            parts.append(branch(x))
        x = torch.cat(parts, dim=1)
        return self.act(self.pw2(self.norm(x)))


class ULite(nn.Module):
    """U-Lite segmentation network (Dinh et al., APSIPA 2023, arXiv:2306.16103), N-d.

    A stem convolution (kernel 7), ``len(features) - 1`` encoder stages of axial depthwise convolutions
    with max-pooling, a bottleneck of axial dilated depthwise branches, as many decoder stages with
    nearest up-sampling and skip concatenation, and a 1x1 output convolution.

    Inputs of any spatial size are accepted: they are padded to a multiple of ``2 ** (len(features) - 1)``
    and the output is cropped back, so the output has the input's spatial size.

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
    ) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        if len(features) < 2:
            raise ValueError(f"features needs at least two entries (stem + one stage), got {features}.")
        if pad_mode not in ("constant", "replicate", "reflect"):
            raise ValueError(f"pad_mode must be 'constant', 'replicate' or 'reflect', got {pad_mode!r}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.pad_mode = pad_mode
        self.divisor = 2 ** (len(features) - 1)
        conv_type = Conv[Conv.CONV, spatial_dims]

        self.conv_in = conv_type(
            in_channels, features[0], kernel_size=stem_kernel_size, padding=(stem_kernel_size - 1) // 2
        )
        self.encoders = nn.ModuleList(
            ULiteEncoderBlock(spatial_dims, features[i], features[i + 1], kernel_size, act, norm)
            for i in range(len(features) - 1)
        )
        self.bottleneck = ULiteBottleneck(spatial_dims, features[-1], bottleneck_dilations, act, norm)
        self.decoders = nn.ModuleList(
            ULiteDecoderBlock(spatial_dims, features[i + 1], features[i], kernel_size, act, norm)
            for i in reversed(range(len(features) - 1))
        )
        self.conv_out = conv_type(features[0], out_channels, kernel_size=1)

    def _check_input(self, x: torch.Tensor) -> None:
        check_input(x, self.spatial_dims, self.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x, crop = pad_to_divisible(x, self.divisor, self.pad_mode)
        x = self.conv_in(x)
        skips: list[torch.Tensor] = []
        for enc in self.encoders:
            x, skip = enc(x)
            skips.append(skip)
        x = self.bottleneck(x)
        n = len(skips)
        for i, dec in enumerate(self.decoders):
            x = dec(x, skips[n - 1 - i])
        return crop_to(self.conv_out(x), crop)

    def fuse(self, channels_last: bool = True) -> nn.Module:
        """An eval-mode equivalent network for inference (see :func:`ulite_monai.networks.fuse_ulite`)."""
        from ulite_monai.networks.fusion import fuse_ulite

        return fuse_ulite(self, channels_last=channels_last)


def check_input(x: torch.Tensor, spatial_dims: int, in_channels: int) -> None:
    """Raise a clear error when ``x`` is not ``(batch, in_channels, *spatial)`` with ``spatial_dims`` dims."""
    if x.dim() != spatial_dims + 2:
        raise ValueError(
            "ULite(spatial_dims=" + str(spatial_dims) + ") expects a (batch, channel, " + str(spatial_dims)
            + " spatial dims) input, got shape " + str(x.shape) + "."
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            "ULite(in_channels=" + str(in_channels) + ") got an input with " + str(x.shape[1])
            + " channels (shape " + str(x.shape) + "); check the channel dim of your data "
            "(EnsureChannelFirst, RGB or greyscale)."
        )


def pad_to_divisible(x: torch.Tensor, divisor: int, mode: str = "constant") -> tuple[torch.Tensor, list[int]]:
    """Pad the spatial dims of ``x`` (symmetrically, extra voxel at the end) up to multiples of ``divisor``.

    Returns the padded tensor and the list ``[start_0, size_0, start_1, size_1, ...]`` to crop back.
    """
    pads: list[int] = []
    crop: list[int] = []
    smallest = x.shape[2]
    for size in x.shape[2:]:
        total = (divisor - size % divisor) % divisor
        before = total // 2
        crop += [before, size]
        pads = [before, total - before] + pads  # F.pad takes the last dim first
        smallest = min(smallest, size)
    # no branch on the pad sizes: keeps TorchScript/ONNX/torch.export graphs shape-generic
    if mode == "reflect" and max(pads) >= smallest:
        mode = "replicate"  # reflection needs more voxels than the pad width
    x = F.pad(x, pads, mode=mode)
    return x, crop


def crop_to(x: torch.Tensor, crop: list[int]) -> torch.Tensor:
    """Crop the spatial dims of ``x`` by the ``[start, size, ...]`` list of :func:`pad_to_divisible`."""
    for i in range(len(crop) // 2):
        x = x.narrow(2 + i, crop[2 * i], crop[2 * i + 1])
    return x
