# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Synthetic CT-like volumes and probe weights for batch tests and throughput measurements."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def body_phantom(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A CT-like volume [z, y, x] in HU: air, an elliptic body (soft tissue), a few dense blobs, noise."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.ogrid[:nz, :ny, :nx]
    body = ((y - ny / 2) / (0.42 * ny)) ** 2 + ((x - nx / 2) / (0.47 * nx)) ** 2 < 1
    vol = np.broadcast_to(np.where(body, 40, -1000), shape).astype(np.float32)
    for _ in range(4):
        c = rng.uniform([0.2 * nz, 0.3 * ny, 0.3 * nx], [0.8 * nz, 0.7 * ny, 0.7 * nx])
        r = rng.uniform(0.05, 0.12) * nx
        blob = ((z - c[0]) * 2.0) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < r**2
        vol[blob] = rng.uniform(60, 250)
    vol += rng.normal(0, 15, shape).astype(np.float32)
    return np.clip(np.round(vol), -1024, 3000).astype(np.int16)


def foreground_probe_checkpoint(bundle: str | Path, path: str | Path) -> Path:
    """Weights for the bundle's ``network_def`` whose output bias says "foreground" everywhere.

    Through the bundle pipeline this labels the CropForegroundd box of each input: a geometry and output-path
    probe (SEG frames get written), not a segmentation model.
    """
    import torch

    from ulite_monai.bundle import Bundle

    b = Bundle(bundle)
    parser = b.parser("inference")
    net = parser.get_parsed_content("network_def")
    state = net.state_dict()
    n_out = b.info(parser).out_channels
    key = [k for k, v in state.items() if k.endswith("bias") and tuple(v.shape) == (n_out,)][-1]
    state[key] = torch.tensor([-30.0] + [30.0] * (n_out - 1))
    torch.save(state, path)
    return Path(path)
