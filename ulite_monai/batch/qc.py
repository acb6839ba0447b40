# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Quality control per series: confidence of the prediction, a ``needs_review`` flag with reasons, a preview PNG.

Confidence is measured on the network's output (the model grid, before the bundle's postprocessing) from the
class probabilities ``p`` (softmax over channels; sigmoid for one channel), over the voxels predicted as any
foreground label:

* ``mean_fg_probability``: mean of the winning class's probability (1 = certain);
* ``mean_fg_entropy``: mean normalised entropy ``-sum(p log p) / log(C)`` (0 = certain, 1 = uniform).

A series ``needs_review`` when any rule of :class:`ReviewRules` fires; each fired rule adds a reason:
no voxel segmented; the foreground takes more than ``max_fraction`` of the volume (implausibly large);
``mean_fg_probability < min_probability`` or ``mean_fg_entropy > max_entropy`` (low confidence); or the
series was resampled onto another grid before inference (uneven slice gaps).

The preview shows three orthogonal planes of the series through the centre of the segmentation (through the
volume centre when it is empty), at their physical aspect ratio, intensities windowed between the 1st and
99th percentile, each label's outline drawn in colour.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ulite_monai.utils import save_atomically

__all__ = ["ReviewRules", "confidence", "review_reasons", "write_preview", "foreground_centre", "ConfidenceProbe"]

_COLOURS = np.array([[255, 60, 60], [60, 220, 60], [70, 140, 255], [255, 210, 0], [220, 70, 255], [0, 220, 220]],
                    dtype=np.uint8)


@dataclass
class ReviewRules:
    """Thresholds of the ``needs_review`` flag (see the module docstring)."""

    max_fraction: float = 0.5
    min_probability: float = 0.8
    max_entropy: float = 0.5


def confidence(logits) -> dict:
    """``{"mean_fg_probability", "mean_fg_entropy", "fg_voxels_model_grid"}`` of a (1, C, ...) network output."""
    import torch

    x = logits.detach().float()
    if x.shape[1] == 1:
        p1 = torch.sigmoid(x)
        probs = torch.cat([1 - p1, p1], dim=1)
    else:
        probs = torch.softmax(x, dim=1)
    top, winner = probs.max(dim=1)
    fg = winner > 0
    n = int(fg.sum())
    if not n:
        return {"mean_fg_probability": None, "mean_fg_entropy": None, "fg_voxels_model_grid": 0}
    ent = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=1) / float(np.log(probs.shape[1]))
    return {"mean_fg_probability": round(float(top[fg].mean()), 4), "mean_fg_entropy": round(float(ent[fg].mean()), 4),
            "fg_voxels_model_grid": n}


class ConfidenceProbe:
    """Measures :func:`confidence` on every raw output of the pipeline (``InferencePipeline.observe``);
    :attr:`last` holds the measures of the latest call."""

    def __init__(self, pipeline) -> None:
        self.last: dict = {}
        pipeline.observe(self._measure)

    def _measure(self, pred) -> None:
        self.last = confidence(pred)


def review_reasons(labels: np.ndarray, label_values, conf: dict, resampled: bool, rules: ReviewRules) -> list[str]:
    """Why a result needs a human look (empty list: it does not)."""
    reasons = []
    fg = np.isin(labels, list(label_values))
    n = int(fg.sum())
    if n == 0:
        reasons.append("empty: no voxel segmented")
    elif n > rules.max_fraction * labels.size:
        reasons.append(f"implausibly large: {n / labels.size:.0%} of the volume segmented (> {rules.max_fraction:.0%})")
    p, h = conf.get("mean_fg_probability"), conf.get("mean_fg_entropy")
    if p is not None and p < rules.min_probability:
        reasons.append(f"low confidence: mean foreground probability {p:.2f} < {rules.min_probability:.2f}")
    if h is not None and h > rules.max_entropy:
        reasons.append(f"low confidence: mean foreground entropy {h:.2f} > {rules.max_entropy:.2f}")
    if resampled:
        reasons.append("resampled: the series was put on another grid before inference (uneven slice gaps)")
    return reasons


def _window(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((plane.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def _panel(image: np.ndarray, labels: np.ndarray, aspect: float, lo: float, hi: float, height: int) -> np.ndarray:
    """One RGB panel: ``image`` rows are ``aspect`` times as tall as columns are wide, outlines in colour."""
    from PIL import Image
    from scipy.ndimage import binary_erosion

    h = height
    w = max(1, int(round(image.shape[1] * height / (image.shape[0] * aspect))))
    grey = np.asarray(Image.fromarray(_window(image, lo, hi)).resize((w, h), Image.BILINEAR))
    lab = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((w, h), Image.NEAREST))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for value in np.unique(lab[lab > 0]):
        mask = lab == value
        edge = mask & ~binary_erosion(mask, iterations=2)
        rgb[edge] = _COLOURS[(int(value) - 1) % len(_COLOURS)]
    return rgb


def foreground_centre(labels: np.ndarray) -> tuple[int, ...]:
    """The index (truncated) of the centroid of ``labels > 0``, or of the array's centre when nothing is labelled.

    From per-axis counts: the same value as ``np.argwhere(labels > 0).mean(axis=0)`` (every sum is an exact
    integer), without the ``[voxels, 3]`` index array: 0.04 s against 0.7 s for 8 million labelled voxels.
    """
    mask = labels > 0
    n = int(mask.sum())
    if n == 0:
        return tuple(int(v) for v in np.asarray(labels.shape) / 2)
    axes = range(mask.ndim)
    return tuple(
        int((mask.sum(axis=tuple(b for b in axes if b != a), dtype=np.int64) * np.arange(mask.shape[a])).sum() / n)
        for a in axes
    )


def write_preview(image: np.ndarray, labels: np.ndarray, spacing, path: str | os.PathLike, title: str = "",
                  height: int = 256) -> Path:
    """Three orthogonal planes through the segmentation's centre as one PNG.

    Args:
        image, labels: arrays indexed [slice, row, column] (the series grid).
        spacing: (column, row, slice) spacing in mm.
        title: a line of text drawn above the panels.
    """
    from PIL import Image, ImageDraw

    k, r, c = foreground_centre(labels)
    sx, sy, sz = (float(v) for v in spacing)
    lo, hi = (float(v) for v in np.percentile(image, [1, 99]))
    panels = [  # (plane, its labels, row/column aspect); slices shown with the last slice on top
        (image[k], labels[k], sy / sx),
        (image[::-1, r, :], labels[::-1, r, :], sz / sx),
        (image[::-1, :, c], labels[::-1, :, c], sz / sy),
    ]
    tiles = [_panel(p, lab, a, lo, hi, height) for p, lab, a in panels]
    gap = 4
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    canvas = np.zeros((height + 18, width, 3), dtype=np.uint8)
    x = 0
    for t in tiles:
        canvas[18:, x:x + t.shape[1]] = t
        x += t.shape[1] + gap
    img = Image.fromarray(canvas)
    ImageDraw.Draw(img).text((4, 3), title[:160], fill=(255, 255, 255))
    save_atomically(lambda tmp: img.save(tmp, format="PNG"), path)
    return Path(path)
