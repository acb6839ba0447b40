# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The work that is timed: an inference call, a training step, a sliding-window pass over a volume.

Each ``make_*`` returns a no-argument callable that runs on the device its tensors are on, under the ``amp``
setting (``"none"``, ``"fp16"``, ``"bf16"``; see :mod:`ulite_monai.bench.device`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from ulite_monai.bench.device import autocast, grad_scaler
from ulite_monai.bench.models import input_shape, io_channels

__all__ = ["make_input", "make_labels", "make_infer", "make_step", "make_train_step", "make_sliding_window"]


def make_input(dims: int, batch: int = 1, size: Sequence[int] | None = None, seed: int = 0,
               device: torch.device | str | None = None, channels: int | None = None) -> torch.Tensor:
    """A random float32 input of the benchmark shape (``channels`` replaces the benchmark's input channels),
    drawn on the CPU (the same values on every device) and moved to ``device``."""
    shape = input_shape(dims, batch, tuple(size) if size else None)
    if channels is not None:
        shape = (shape[0], int(channels)) + shape[2:]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return x.to(device) if device is not None else x


def make_labels(x: torch.Tensor, out_channels: int, seed: int = 1) -> torch.Tensor:
    """Random targets for ``x``: a binary mask (``out_channels == 1``, sigmoid losses) or class indices in
    ``[0, out_channels)`` as one channel (softmax losses with ``to_onehot_y``), float32, on ``x``'s device."""
    g = torch.Generator().manual_seed(seed)
    shape = (x.shape[0], 1) + tuple(x.shape[2:])
    if out_channels == 1:
        y = (torch.rand(shape, generator=g) > 0.7).float()
    else:
        y = torch.randint(0, out_channels, shape, generator=g).float()
    return y.to(x.device)


def make_infer(fn: Callable, x: torch.Tensor, amp: str = "none") -> Callable[[], torch.Tensor]:
    """A no-argument callable running ``fn(x)`` under ``torch.inference_mode`` (and autocast for ``amp``)."""
    device = x.device

    def call() -> torch.Tensor:
        with torch.inference_mode(), autocast(device, amp):
            return fn(x)

    return call


def make_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable,
              optimizer: torch.optim.Optimizer, amp: str = "none") -> Callable[[], torch.Tensor]:
    """One training step as MONAI's ``SupervisedTrainer`` does it: zero the gradients, forward and loss under
    autocast, backward and optimiser step through a ``GradScaler`` (enabled for ``fp16``). Returns the loss
    (detached, not synchronised)."""
    scaler = grad_scaler(x.device, amp)
    device = x.device
    net.train()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    return step


def make_train_step(net: nn.Module, dims: int, batch: int = 1, size: Sequence[int] | None = None,
                    lr: float = 1e-3, device: torch.device | str | None = None,
                    amp: str = "none") -> Callable[[], torch.Tensor]:
    """The speed mode's training step: benchmark-shaped random input and targets, DiceCE loss (sigmoid for one
    output channel, softmax otherwise), Adam; on ``device`` (default: where ``net`` is)."""
    from monai.losses import DiceCELoss

    _, cout = io_channels(dims)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    x = make_input(dims, batch, size, device=device)
    y = make_labels(x, cout)
    loss_fn = DiceCELoss(sigmoid=True) if cout == 1 else DiceCELoss(softmax=True, to_onehot_y=True)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    return make_step(net, x, y, loss_fn, opt, amp)


def make_sliding_window(fn: Callable, roi_size: Sequence[int], sw_batch_size: int, overlap: float,
                        mode: str = "gaussian", amp: str = "none", **kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """``volume -> logits`` with MONAI's :class:`~monai.inferers.SlidingWindowInferer` (no grad; autocast for
    ``amp``, as the bundle's pipeline runs its inferer)."""
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(roi_size=tuple(int(r) for r in roi_size), sw_batch_size=int(sw_batch_size),
                                   overlap=float(overlap), mode=mode, **kwargs)

    def run(volume: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(volume.device, amp):
            return inferer(volume, fn)

    return run
