# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Shared helpers for the bundle/reader/data tests (no test collected here)."""

from __future__ import annotations

import locale
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "ulite"
CONFIGS = BUNDLE / "configs"


def oblique_direction(left_handed: bool = False) -> np.ndarray:
    """A rotated (oblique) 3x3 direction matrix, optionally with one axis flipped (left-handed)."""
    a, b = np.deg2rad(20.0), np.deg2rad(-12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    d = rz @ rx
    if left_handed:
        d = d @ np.diag([1.0, 1.0, -1.0])
    return d


def blob_volume(shape=(40, 36, 28), seed: int = 0) -> np.ndarray:
    """An int16 (z, y, x) volume with a bright off-centre blob: any flip or shift of it is visible."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    c = np.array(shape, dtype=np.float32) * np.array([0.35, 0.6, 0.3])
    r = np.sqrt(((zz - c[0]) / 6) ** 2 + ((yy - c[1]) / 9) ** 2 + ((xx - c[2]) / 7) ** 2)
    vol = np.where(r < 1.0, 200.0, 0.0) + rng.normal(scale=5, size=shape)
    vol[: shape[0] // 4, :4, :] += 120.0  # asymmetric bar
    return vol.astype(np.int16)


def sitk_image(arr_zyx: np.ndarray, spacing=(1.1, 0.9, 2.0), origin=(-40.0, 25.0, 110.0), left_handed=False):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(tuple(oblique_direction(left_handed).flatten().tolist()))
    return img


def write_dicom_series(img, folder: Path, series_uid: str | None = None) -> Path:
    """Write a 3D SimpleITK image as a CT DICOM series, one file per slice (shuffled file names)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    uid_root = "1.2.826.0.1.3680043.8.498."
    series_uid = series_uid or uid_root + str(int(time.time() * 1e6) % 10**12)
    study_uid = series_uid + ".1"
    direction = img.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = img.GetDepth()
    # GDCM's DICOM writer leaves the process's LC_CTYPE at "C", which turns Python's default text encoding
    # into ASCII for every later test in the process (open() of any UTF-8 file then fails): put it back
    saved_ctype = locale.setlocale(locale.LC_CTYPE)
    try:
        _write_slices(img, folder, writer, n, series_uid, study_uid, direction)
    finally:
        locale.setlocale(locale.LC_CTYPE, saved_ctype)
    return folder


def _write_slices(img, folder: Path, writer, n: int, series_uid: str, study_uid: str, direction) -> None:
    for i in range(n):
        sl = img[:, :, i]
        pos = img.TransformIndexToPhysicalPoint((0, 0, i))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{i + 1}",
            "0008|0060": "CT",
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0052": study_uid + ".9",
            "0020|0011": "1",
            "0020|0013": str(i + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in pos),
            "0020|0037": "\\".join(f"{d:.8f}" for d in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])),
            "0018|0050": f"{img.GetSpacing()[2]:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for k, v in tags.items():
            sl.SetMetaData(k, v)
        writer.SetFileName(str(folder / f"s{series_uid[-4:]}_{(i * 7919) % 1000:04d}_{i}.dcm"))
        writer.Execute(sl)


def env_without_threads() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class MeanThreshold2D:
    """Builds a stand-in 2D "network" for slice-wise tests: one logit, positive where the channel mean of the
    (scaled) input is above ``threshold`` (a torch module; built lazily so importing this file needs no torch)."""

    def __new__(cls, threshold: float = 0.5, **_):
        import torch

        class _Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.dummy = torch.nn.Parameter(torch.zeros(1))

            def forward(self, x):
                if x.dim() != 4:
                    raise ValueError(f"2D network called with a {x.dim() - 2}D input")
                return (x.mean(1, keepdim=True) - threshold) * 100.0 + 0 * self.dummy

        return _Net()
