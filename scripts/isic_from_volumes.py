#!/usr/bin/env python
# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Lay out 2D slices of real scans with their real masks as an ISIC-2018-style folder, for the 2D bundle.

Each chosen slice becomes ``<case>_<axis><index>.jpg`` (8-bit grey repeated to RGB, as the 2D bundle reads
photos) and ``<case>_<axis><index>_segmentation.png`` (0/255), so that

    python -m monai.bundle run training --config_file bundles/ulite_2d/configs/train.json --dataset_dir OUT

trains on them exactly as on an ISIC 2018 download. Volumes are read with SimpleITK and reoriented to RAS;
MR is scaled between its 0.5 and 99.5 percentiles, CT through ``--ct-window``.

Example (the real scans beside the repository; Colin27's brain mask in three orientations plus the lesion
slices of the CT and MR cases)::

    python scripts/isic_from_volumes.py --data ../shared/data/real --out /tmp/real_isic --every 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

CASES = {  # name: (image, mask, modality, mask rule)
    "colin27": ("colin27/ch2.nii.gz", "colin27/ch2bet.nii.gz", "MR", "positive"),
    "lung1": ("lung1_image.nrrd", "lung1_label.nrrd", "CT", "positive"),
    "lung2": ("lung2_image.nrrd", "lung2_label.nrrd", "CT", "positive"),
    "brain1": ("brain1_image.nrrd", "brain1_label.nrrd", "MR", "positive"),
    "brain2": ("brain2_image.nrrd", "brain2_label.nrrd", "MR", "positive"),
}


def _ras(path: Path):
    import SimpleITK as sitk

    img = sitk.DICOMOrient(sitk.ReadImage(str(path)), "RAS")
    return sitk.GetArrayFromImage(img)  # (z, y, x) of the RAS image


def _to_uint8(vol: np.ndarray, modality: str, ct_window: tuple[float, float]) -> np.ndarray:
    if modality == "CT":
        lo, hi = ct_window
    else:
        lo, hi = np.percentile(vol, [0.5, 99.5])
    return np.clip(np.rint((vol.astype(np.float64) - lo) / max(hi - lo, 1e-6) * 255.0), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> dict:
    from PIL import Image

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder of the real scans (../shared/data/real)")
    p.add_argument("--out", type=Path, required=True, help="ISIC-style output folder")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--every", type=int, default=3, help="take every N-th slice with foreground (Colin27)")
    p.add_argument("--axes", nargs="+", default=["axial", "coronal", "sagittal"],
                   help="slice orientations (Colin27, 1 mm isotropic); the thick-slice cases use axial only")
    p.add_argument("--min-pixels", type=int, default=20, help="slices with fewer foreground pixels are left out")
    p.add_argument("--ct-window", type=float, nargs=2, default=(-1000.0, 400.0))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    made: dict[str, int] = {}
    for name in args.cases:
        image_file, mask_file, modality, _ = CASES[name]
        vol, mask = _ras(args.data / image_file), _ras(args.data / mask_file) > 0
        if vol.shape != mask.shape:
            raise SystemExit(f"{name}: image {vol.shape} and mask {mask.shape} differ")
        vol8 = _to_uint8(vol, modality, tuple(args.ct_window))
        axes = args.axes if name == "colin27" else ["axial"]
        every = args.every if name == "colin27" else 1
        n = 0
        for axis in axes:
            dim = {"axial": 0, "coronal": 1, "sagittal": 2}[axis]
            kept = [i for i in range(vol.shape[dim]) if np.take(mask, i, axis=dim).sum() >= args.min_pixels]
            for i in kept[::every]:
                # RAS array (z, y, x): flip rows so anterior/superior is up, as a viewer shows the slice
                img2d = np.flipud(np.take(vol8, i, axis=dim))
                m2d = np.flipud(np.take(mask, i, axis=dim))
                stem = f"{name}_{axis}{i:03d}"
                Image.fromarray(np.repeat(img2d[..., None], 3, -1)).save(args.out / f"{stem}.jpg", quality=95)
                Image.fromarray((m2d * 255).astype(np.uint8)).save(args.out / f"{stem}_segmentation.png")
                n += 1
        made[name] = n
    summary = {"out": str(args.out), "images": made, "total": sum(made.values())}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
