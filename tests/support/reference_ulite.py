# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""U-Lite laid out the way the reference code names its modules (written from the architecture and the
names listed in ulite_monai/networks/reference.py), to train "reference" checkpoints in tests.

Modules: ``conv_in``; ``e1..e5`` with ``dw.dw_h``, ``dw.dw_w``, ``bn``, ``pw``; ``b5`` with ``pw1``,
``dw1..dw3`` (each ``dw_h``, ``dw_w``), ``bn``, ``pw2``; ``d5..d1`` with ``pw``, ``bn``, ``dw.dw_h``,
``dw.dw_w``, ``pw2``; ``conv_out``. A Lightning module holding it as ``self.model`` saves ``model.``-prefixed
keys under ``state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Axial(nn.Module):
    def __init__(self, c: int, k: int = 7, d: int = 1) -> None:
        super().__init__()
        self.dw_h = nn.Conv2d(c, c, (k, 1), padding="same", groups=c, dilation=d)
        self.dw_w = nn.Conv2d(c, c, (1, k), padding="same", groups=c, dilation=d)

    def forward(self, x):
        return x + self.dw_h(x) + self.dw_w(x)


class Enc(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.dw = Axial(cin)
        self.bn = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        skip = self.bn(self.dw(x))
        return F.gelu(F.max_pool2d(self.pw(skip), 2)), skip


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        g = c // 4
        self.pw1 = nn.Conv2d(c, g, 1)
        self.dw1, self.dw2, self.dw3 = Axial(g, 3, 1), Axial(g, 3, 2), Axial(g, 3, 3)
        self.bn = nn.BatchNorm2d(4 * g)
        self.pw2 = nn.Conv2d(4 * g, c, 1)

    def forward(self, x):
        x = self.pw1(x)
        x = torch.cat([x, self.dw1(x), self.dw2(x), self.dw3(x)], 1)
        return F.gelu(self.pw2(self.bn(x)))


class Dec(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.pw = nn.Conv2d(cin + cout, cout, 1)
        self.bn = nn.BatchNorm2d(cout)
        self.dw = Axial(cout)
        self.pw2 = nn.Conv2d(cout, cout, 1)

    def forward(self, x, skip):
        x = torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skip], 1)
        return F.gelu(self.pw2(self.dw(self.bn(self.pw(x)))))


class ReferenceULite(nn.Module):
    """The paper's 2D U-Lite with the reference code's module names (input sides a multiple of 32)."""

    def __init__(self, in_ch: int = 3, out_ch: int = 1, f=(16, 32, 64, 128, 256, 512)) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, f[0], 7, padding=3)
        for i in range(1, 6):
            setattr(self, f"e{i}", Enc(f[i - 1], f[i]))
        self.b5 = Bottleneck(f[5])
        for i in range(5, 0, -1):
            setattr(self, f"d{i}", Dec(f[i], f[i - 1]))
        self.conv_out = nn.Conv2d(f[0], out_ch, 1)

    def forward(self, x):
        x = self.conv_in(x)
        skips = []
        for i in range(1, 6):
            x, s = getattr(self, f"e{i}")(x)
            skips.append(s)
        x = self.b5(x)
        for i in range(5, 0, -1):
            x = getattr(self, f"d{i}")(x, skips[i - 1])
        return self.conv_out(x)


class LightningLike(nn.Module):
    """What a Lightning module holding the network as ``self.model`` saves: ``model.``-prefixed keys."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_weight = nn.Parameter(torch.ones(1), requires_grad=False)  # other state beside the model
