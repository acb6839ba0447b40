# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Overlay previews: a label's outline drawn over its image, saved as PNG or JPEG."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ulite_monai.utils import save_atomically

__all__ = ["to_display_rgb", "contour_overlay", "save_overlay"]

_COLOURS = np.array([[255, 64, 64], [64, 255, 64], [64, 160, 255], [255, 220, 0], [255, 64, 255], [0, 255, 255]],
                    dtype=np.uint8)


def to_display_rgb(image: np.ndarray) -> np.ndarray:
    """An 8-bit RGB (rows, columns, 3) view of a grey or colour image (rows, columns[, c]).

    8-bit data is kept as is; other ranges are stretched between the 1st and 99th percentile.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[-1] >= 3:
        img = img[..., :3]
    if img.size and (img.min() < 0 or img.max() > 255 or img.max() <= 1.0):
        lo, hi = np.percentile(img, [1, 99])
        img = (img - lo) / max(hi - lo, 1e-6) * 255.0
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img


def contour_overlay(image: np.ndarray, labels: np.ndarray, width: int = 1) -> np.ndarray:
    """``image`` (rows, columns[, c]) as 8-bit RGB with the outline of each label of ``labels`` (rows, columns)
    drawn in its own colour; ``width`` pixels thick."""
    from scipy import ndimage

    rgb = to_display_rgb(image).copy()
    labels = np.asarray(labels)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"label {labels.shape} and image {rgb.shape[:2]} differ in size.")
    for i, value in enumerate(v for v in np.unique(labels) if v != 0):
        mask = labels == value
        edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, width), border_value=0)
        rgb[edge] = _COLOURS[i % len(_COLOURS)]
    return rgb


def save_overlay(image: np.ndarray, labels: np.ndarray, path: str | os.PathLike, width: int = 1) -> Path:
    """Write :func:`contour_overlay` to ``path`` (PNG or JPEG by suffix), atomically."""
    from PIL import Image

    out = Image.fromarray(contour_overlay(image, labels, width))
    fmt = "JPEG" if str(path).lower().endswith((".jpg", ".jpeg")) else "PNG"
    save_atomically(lambda tmp: out.save(tmp, format=fmt, **({"quality": 92} if fmt == "JPEG" else {})), path)
    return Path(path)
