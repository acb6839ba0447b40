# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The work that is timed: an inference call, a training step, a sliding-window pass over a volume."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from ulite_monai.bench.models import input_shape, io_channels

__all__ = ["make_input", "make_infer", "make_train_step", "make_sliding_window"]


def make_input(dims: int, batch: int = 1, size: Sequence[int] | None = None, seed: int = 0) -> torch.Tensor:
    """A random float32 input of the benchmark shape."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(input_shape(dims, batch, tuple(size) if size else None), generator=g)


def make_infer(fn: Callable, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A no-argument callable running ``fn(x)`` under ``torch.inference_mode``."""

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return fn(x)

    return call


def make_train_step(net: nn.Module, dims: int, batch: int = 1, size: Sequence[int] | None = None,
                    lr: float = 1e-3) -> Callable[[], float]:
    """A no-argument callable doing one training step (forward, DiceCE loss, backward, Adam step)."""
    from monai.losses import DiceCELoss

    _, cout = io_channels(dims)
    x = make_input(dims, batch, size)
    g = torch.Generator().manual_seed(1)
    if cout == 1:
        loss_fn = DiceCELoss(sigmoid=True)
        y = (torch.rand((batch, 1) + tuple(x.shape[2:]), generator=g) > 0.7).float()
    else:
        loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
        y = torch.randint(0, cout, (batch, 1) + tuple(x.shape[2:]), generator=g).float()
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def make_sliding_window(fn: Callable, roi_size: Sequence[int], sw_batch_size: int, overlap: float,
                        mode: str = "gaussian", **kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """``volume -> logits`` with MONAI's :class:`~monai.inferers.SlidingWindowInferer` (no grad)."""
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(roi_size=tuple(int(r) for r in roi_size), sw_batch_size=int(sw_batch_size),
                                   overlap=float(overlap), mode=mode, **kwargs)

    def run(volume: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return inferer(volume, fn)

    return run
