# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Surface-distance metrics in millimetres (spacing read from the MetaTensor) and their Ignite handlers."""

from __future__ import annotations

import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric

__all__ = ["SpacingHausdorffDistanceMetric", "SpacingSurfaceDistanceMetric", "HD95", "MeanSurfaceDistance"]


def _spacing_of(y_pred) -> list | None:
    pixdim = getattr(y_pred, "pixdim", None)
    if pixdim is None:
        return None
    return [float(s) for s in torch.as_tensor(pixdim).flatten().tolist()][: y_pred.ndim - 2]


class SpacingHausdorffDistanceMetric(HausdorffDistanceMetric):
    """:class:`~monai.metrics.HausdorffDistanceMetric` in millimetres: spacing read from the MetaTensor."""

    def _compute_tensor(self, y_pred, y, **kwargs):  # type: ignore[override]
        kwargs.setdefault("spacing", _spacing_of(y_pred))
        return super()._compute_tensor(y_pred, y, **kwargs)


class SpacingSurfaceDistanceMetric(SurfaceDistanceMetric):
    """:class:`~monai.metrics.SurfaceDistanceMetric` (mean surface distance) in millimetres."""

    def _compute_tensor(self, y_pred, y, **kwargs):  # type: ignore[override]
        kwargs.setdefault("spacing", _spacing_of(y_pred))
        return super()._compute_tensor(y_pred, y, **kwargs)


class HD95(IgniteMetricHandler):
    """Ignite handler for the 95th-percentile symmetric Hausdorff distance in mm (per-case details saved).

    Args:
        include_background: include channel 0.
        output_transform: e.g. ``monai.handlers.from_engine(["pred", "label"])``.
        save_details: keep per-case values for ``MetricsSaver``.
    """

    def __init__(self, include_background: bool = False, output_transform=lambda x: x, save_details: bool = True):
        metric_fn = SpacingHausdorffDistanceMetric(include_background=include_background, percentile=95.0)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class MeanSurfaceDistance(IgniteMetricHandler):
    """Ignite handler for the symmetric mean surface distance in mm (per-case details saved).

    Args:
        include_background: include channel 0.
        output_transform: e.g. ``monai.handlers.from_engine(["pred", "label"])``.
        save_details: keep per-case values for ``MetricsSaver``.
    """

    def __init__(self, include_background: bool = False, output_transform=lambda x: x, save_details: bool = True):
        metric_fn = SpacingSurfaceDistanceMetric(include_background=include_background, symmetric=True)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)
