# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Helpers for the DICOM / batch tests: phantoms, generated series, a small stand-in bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]
REAL_BUNDLE = REPO / "bundles" / "ulite"


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from angles in degrees (x, then y, then z)."""
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def phantom(shape=(10, 20, 24), seed=0, centre=None, radius=5.0) -> np.ndarray:
    """An int16 CT-like volume [z, y, x]: noisy background around -500, an asymmetric blob around 300."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = centre if centre is not None else (shape[0] * 0.4, shape[1] * 0.55, shape[2] * 0.35)
    d = ((z - c[0]) / 1.0) ** 2 + ((y - c[1]) / 1.3) ** 2 + ((x - c[2]) / 1.8) ** 2
    vol = np.where(d < radius**2, 300, -500) + rng.integers(-40, 40, shape)
    return vol.astype(np.int16)


class ThresholdNet(torch.nn.Module):
    """Deterministic stand-in "network": two logits, foreground where the (scaled) input > threshold."""

    def __init__(self, threshold: float = 0.0, delay_s: float = 0.0) -> None:
        super().__init__()
        self.threshold = threshold
        self.delay_s = delay_s  # lets a test kill the batch while it is busy
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        fg = (x - self.threshold) * 10.0
        return torch.cat([torch.zeros_like(fg), fg], dim=1) + 0 * self.dummy


def standin_inference_config(network_def: dict | None = None, roi=(16, 16, 16)) -> dict:
    """Same ids and structure the ulite bundle's inference.json uses (image key, SimpleITK reader,
    sliding window, Invertd, SaveImaged); no resampling so geometry checks can be exact."""
    return {
        "imports": ["$import torch", "$import monai", "$import ulite_monai"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cpu')",
        "network_def": network_def or {"_target_": "support.dicom.ThresholdNet", "threshold": 0.0},
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "reader": "ulite_monai.io.sitk_reader.SITKReader"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -1000,
                    "a_max": 1000,
                    "b_min": -1.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(roi), "sw_batch_size": 2, "overlap": 0.25},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "seg",
                    "output_dtype": "$numpy.uint8",
                    "resample": False,
                    "separate_folder": False,
                },
            ],
        },
    }


def standin_metadata(channel_def=None) -> dict:
    return {
        "name": "ulite-standin",
        "version": "0.0.1",
        "network_data_format": {
            "outputs": {
                "pred": {
                    "type": "image",
                    "num_channels": 2,
                    "channel_def": channel_def or {"0": "background", "1": "spleen"},
                }
            }
        },
    }


def make_standin_bundle(root: Path, network_def: dict | None = None, channel_def=None) -> Path:
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    cfg = standin_inference_config(network_def)
    cfg["imports"].append("$import numpy")
    (root / "configs" / "inference.json").write_text(json.dumps(cfg, indent=2))
    (root / "configs" / "metadata.json").write_text(json.dumps(standin_metadata(channel_def), indent=2))
    return root


def run_cli(args: list[str], timeout: float = 240, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m ulite_monai.batch ARGS`` with the tests folder importable (stand-in network)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "ulite_monai.batch", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(REPO),
    )


def read_manifest(out: Path) -> dict[str, dict]:
    rows = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r["key"]] = r
    return rows


def seg_frames_by_source(seg_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """SEG frame masks keyed by referenced source SOPInstanceUID: (mask, frame ImagePositionPatient)."""
    import pydicom

    ds = pydicom.dcmread(str(seg_path))
    arr = ds.pixel_array
    if arr.ndim == 2:
        arr = arr[None]
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        src = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ident = fg if "SegmentIdentificationSequence" in fg else ds.SharedFunctionalGroupsSequence[0]
        seg_no = ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        pos = np.array([float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])
        prev = out.get(src, (np.zeros(arr.shape[1:], np.uint8), pos))[0]
        out[src] = (np.maximum(prev, (arr[i] > 0).astype(np.uint8) * int(seg_no)), pos)
    return out


def require_dciodvfy() -> None:
    """dciodvfy (Debian package dicom3tools) must be on PATH in CI; elsewhere its absence skips."""
    import shutil

    import pytest

    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("dciodvfy (Debian package dicom3tools) is not on PATH in CI: apt-get install dicom3tools")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")


def dciodvfy_errors(path: Path) -> list[str]:
    """Error lines of dciodvfy (Debian dicom3tools) for a file."""
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
