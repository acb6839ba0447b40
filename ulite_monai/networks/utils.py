# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Helpers shared by :class:`~ulite_monai.networks.ULite` and its fused inference form: input checks,
padding to a multiple of the network's stride and cropping back, channels-last memory formats, the running
statistics of the batch norms that bypass ``nn.BatchNorm``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["check_input", "pad_to_divisible", "crop_to", "channels_last_format", "is_channels_last",
           "update_running_stats"]


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


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    """``torch.channels_last`` for 2D batches, ``torch.channels_last_3d`` for 3D ones."""
    if spatial_dims == 2:
        return torch.channels_last
    if spatial_dims == 3:
        return torch.channels_last_3d
    raise ValueError(f"channels-last formats exist for 2 or 3 spatial dims, got {spatial_dims}.")


def is_channels_last(x: torch.Tensor) -> bool:
    """True when a 4D/5D batch is stored channels-last (``channels_last`` or ``channels_last_3d``)."""
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def update_running_stats(norm: torch.nn.Module, mean: torch.Tensor, var: torch.Tensor, m: int) -> None:
    """Move a training ``BatchNorm``'s running statistics towards the batch's ``mean`` and biased ``var`` (over ``m``
    values per channel) as ``nn.BatchNorm`` does: momentum or cumulative average, the unbiased variance."""
    if not (norm.training and norm.track_running_stats and norm.running_mean is not None):
        return
    factor = 0.0
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    with torch.no_grad():
        norm.running_mean.lerp_(mean, factor)
        norm.running_var.lerp_(var * (m / (m - 1)), factor)
