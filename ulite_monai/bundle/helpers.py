# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Helpers the bundle's JSON configs call (``$ulite_monai.bundle.<name>(...)``): the network with its weights,
the sliding-window inferer whose windows fit the image, an atomic NIfTI writer, and the lines that report a
finished training or evaluation."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.data import NibabelWriter, PILWriter
from monai.inferers import SlidingWindowInferer

from ulite_monai.bundle.weights import load_weights
from ulite_monai.utils import save_atomically

__all__ = ["load_network", "FitSlidingWindowInferer", "AtomicNibabelWriter", "AtomicPILWriter", "atomic_writer",
           "report_training", "report_evaluation"]


def load_network(
    network_def: torch.nn.Module,
    ckpt_path: str | os.PathLike | None,
    device: str | torch.device = "cpu",
    fuse: bool = True,
) -> torch.nn.Module:
    """``network_def`` with the checkpoint's weights, in eval mode on ``device``, fused when asked.

    Args:
        network_def: the instantiated network (``@network_def``).
        ckpt_path: a checkpoint in any layout :func:`~ulite_monai.bundle.read_checkpoint` reads; ``None``/empty
            keeps the network's current weights.
        device: where the network runs.
        fuse: use :func:`ulite_monai.networks.inference_network` (BatchNorm folded, axial blocks merged) for a
            ULite; other networks run as they are, in eval mode.
    """
    if ckpt_path:
        load_weights(network_def, ckpt_path)
    from ulite_monai.networks import inference_network

    return inference_network(network_def.to(device).eval(), fuse=fuse).to(device)


class FitSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's :class:`~monai.inferers.SlidingWindowInferer` with windows no larger than the image needs.

    Along each axis where the image, rounded up to a multiple of ``size_multiple``, is shorter than ``roi_size``,
    the window is that rounded length instead. MONAI's inferer would pad the image up to the whole ``roi_size``
    and compute the padding too: at the bundle's 3 mm a chest CT is about 100 x 80 x 80 voxels, which one
    128^3 window covers at 3.5 times the voxels it needs. Images larger than ``roi_size`` get the usual windows.
    With one window the Gaussian weights divide out, so the result is the network on the (rounded) image.

    Args:
        roi_size: the largest window, as for :class:`~monai.inferers.SlidingWindowInferer`.
        size_multiple: a shrunk window's lengths are multiples of this: a network's size divisor (16 for the
            bundle's networks: U-Lite's four poolings, MONAI UNet's four strides).
        args, kwargs: the rest of :class:`~monai.inferers.SlidingWindowInferer`'s arguments.
    """

    def __init__(self, roi_size: Sequence[int] | int, *args, size_multiple: int = 16, **kwargs) -> None:
        super().__init__(roi_size, *args, **kwargs)
        if int(size_multiple) < 1:
            raise ValueError(f"size_multiple must be a positive integer, got {size_multiple!r}.")
        self.size_multiple = int(size_multiple)

    def _full_roi(self, n: int) -> tuple[int, ...]:
        return (self.roi_size,) * n if isinstance(self.roi_size, int) else tuple(self.roi_size)

    def fitted_roi(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """The window for an image of ``spatial_shape``: ``roi_size`` capped by the rounded image size (a
        non-positive ``roi_size`` entry, MONAI's "the whole axis", stays as it is)."""
        roi = self._full_roi(len(spatial_shape))
        if len(roi) != len(spatial_shape):
            return roi  # MONAI's own check names the mismatch
        k = self.size_multiple
        # at least one multiple: an empty axis (a foreground crop that found nothing) still gets a window, as MONAI's
        # own inferer gives it (a window of 0 would make MONAI take the axis' size, 0, and fail)
        return tuple(r if r <= 0 else min(int(r), k * max(1, math.ceil(int(s) / k)))
                     for r, s in zip(roi, spatial_shape))

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        roi = self.fitted_roi(tuple(inputs.shape[2:]))
        if roi == self._full_roi(len(roi)):
            return super().__call__(inputs, network, *args, **kwargs)
        fitted = copy.copy(self)  # per call: concurrent requests (the Label server) may bring other sizes
        fitted.roi_size = roi
        fitted.roi_weight_map = None  # a cached map is for the full window
        return SlidingWindowInferer.__call__(fitted, inputs, network, *args, **kwargs)


class AtomicNibabelWriter(NibabelWriter):
    """``monai.data.NibabelWriter`` that writes to a temporary file in the target folder, then renames it.

    Use with ``SaveImaged(writer=...)``: an interrupted run never leaves a half-written output.
    """

    def write(self, filename, verbose: bool = False, **obj_kwargs):  # type: ignore[override]
        target = Path(filename)
        save_atomically(lambda tmp: NibabelWriter.write(self, tmp, verbose=False, **obj_kwargs), target)
        if verbose:
            print(f"file written: {target}.", flush=True)


class AtomicPILWriter(PILWriter):
    """``monai.data.PILWriter`` (PNG, JPEG, TIFF masks) writing through a temporary file and a rename."""

    def write(self, filename, verbose: bool = False, **kwargs):  # type: ignore[override]
        target = Path(filename)
        save_atomically(lambda tmp: PILWriter.write(self, tmp, verbose=False, **kwargs), target)
        if verbose:
            print(f"file written: {target}.", flush=True)


def atomic_writer(output_ext: str):
    """The atomic writer class for ``output_ext``: PIL for ``.png/.jpg/.jpeg/.tif/.tiff/.bmp``, else NIfTI."""
    return AtomicPILWriter if str(output_ext).lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp") else (
        AtomicNibabelWriter)


def report_training(trainer, evaluator, ckpt_dir: str | os.PathLike) -> dict:
    """Print (one JSON line) and return the best validation metric, its epoch and the best model's path."""
    best = getattr(evaluator.state, "best_metric", None)
    epoch = getattr(evaluator.state, "best_metric_epoch", None)
    model = Path(ckpt_dir) / "model.pt"
    info = {
        "best_val_metric": None if best is None or best == -1 else float(best),
        "best_val_epoch": epoch,
        "epochs": trainer.state.epoch,
        "model": str(model) if model.exists() else None,
    }
    print(f"ulite training done: {json.dumps(info)}", flush=True)
    return info


def report_evaluation(output_dir: str | os.PathLike) -> dict:
    """Print (one JSON line) and return the metrics ``MetricsSaver`` wrote (``metrics.csv``) and the CSV paths."""
    out = Path(output_dir)
    metrics = {}
    if (out / "metrics.csv").is_file():
        with open(out / "metrics.csv") as f:
            metrics = {row[0]: float(row[1]) for row in csv.reader(f) if len(row) >= 2}
    info = {
        "metrics": metrics,
        "per_case": sorted(str(p) for p in out.glob("*_raw.csv")),
        "summaries": sorted(str(p) for p in out.glob("*_summary.csv")),
    }
    print(f"ulite evaluation done: {json.dumps(info)}", flush=True)
    return info
