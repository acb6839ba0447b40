# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""ISIC-2018-style 2D folders (images ``*.jpg``, masks ``*_segmentation.png``) and a tiny 2D demo set.

The ISIC 2018 Task 1 release puts images and masks in two folders
(``..._Training_Input/ISIC_0000000.jpg`` and ``..._Training_GroundTruth/ISIC_0000000_segmentation.png``);
copies often put both in one folder. :func:`isic_pairs` accepts either: it pairs every ``<stem>.jpg``
found under the folder with a ``<stem>_segmentation.png`` found anywhere under the same folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ulite_monai.utils import save_atomically

__all__ = ["isic_pairs", "isic_split", "generate_isic_demo", "is_isic_folder"]

MASK_SUFFIX = "_segmentation.png"
IMAGE_SUFFIXES = (".jpg", ".jpeg")


def is_isic_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds at least one ``*_segmentation.png`` mask."""
    return Path(folder).is_dir() and next(Path(folder).rglob(f"*{MASK_SUFFIX}"), None) is not None


def isic_pairs(folder: str | os.PathLike) -> list[dict[str, str]]:
    """``[{"image": ..jpg, "label": .._segmentation.png}, ...]`` sorted by image name.

    Raises:
        FileNotFoundError: the folder is missing, holds no images, or an image has no mask (the message
            names the first images without one).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"ISIC-style dataset folder not found: {root}.")
    masks = {p.name[: -len(MASK_SUFFIX)]: p for p in root.rglob(f"*{MASK_SUFFIX}")}
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise FileNotFoundError(f"no *.jpg images under {root}: expected ISIC-style <name>.jpg + <name>{MASK_SUFFIX}.")
    missing = [str(p) for p in images if p.stem not in masks]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) under {root} have no <name>{MASK_SUFFIX} mask, e.g. {missing[:3]}: "
            "add the masks or remove those images."
        )
    return [{"image": str(p), "label": str(masks[p.stem])} for p in images]


def isic_split(pairs: list[dict], val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[dict]]:
    """Deterministic train/validation split of :func:`isic_pairs` output."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = max(1, int(round(len(pairs) * val_fraction))) if len(pairs) > 1 else 0
    val = sorted(int(i) for i in order[:n_val])
    return {
        "training": [pairs[i] for i in range(len(pairs)) if i not in set(val)],
        "validation": [pairs[i] for i in val],
    }


def _lesion_case(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    ang = np.arctan2(yy - cy, xx - cx)
    base = rng.uniform(0.15, 0.3) * min(h, w)
    radius = base * (1 + sum(rng.uniform(-0.15, 0.15) * np.cos(k * ang + rng.uniform(0, 6.3)) for k in (2, 3, 5)))
    mask = np.hypot(yy - cy, xx - cx) < radius
    skin = np.array([rng.uniform(180, 230), rng.uniform(130, 180), rng.uniform(110, 160)], dtype=np.float32)
    lesion = skin * rng.uniform(0.35, 0.6)
    shade = 1 + 0.15 * np.cos(xx / w * rng.uniform(2, 5) + rng.uniform(0, 6.3))[..., None]
    img = np.where(mask[..., None], lesion, skin) * shade + rng.normal(scale=12, size=(h, w, 3))
    # hair-like dark lines crossing lesion and skin
    for _ in range(int(rng.integers(1, 4))):
        a, b = rng.uniform(-1, 1), rng.uniform(0, h)
        img[np.abs(yy - (a * xx + b)) < 0.8] *= 0.4
    return np.clip(img, 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def generate_isic_demo(
    folder: str | os.PathLike, num_cases: int = 10, size: tuple[int, int] = (96, 128), seed: int = 2018
) -> list[dict[str, str]]:
    """Write a tiny ISIC-style set (``demo_XXX.jpg`` + ``demo_XXX_segmentation.png``) and return its pairs.

    Args:
        folder: output folder (created).
        num_cases: number of image/mask pairs.
        size: (height, width) of the images.
        seed: random seed; the same seed gives the same files.
    """
    from PIL import Image

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_cases):
        img, mask = _lesion_case(rng, size)
        for arr, name, fmt in ((img, f"demo_{i:03d}.jpg", "JPEG"), (mask, f"demo_{i:03d}{MASK_SUFFIX}", "PNG")):
            opts = {"quality": 95} if fmt == "JPEG" else {}
            save_atomically(lambda tmp, a=arr, f=fmt, o=opts: Image.fromarray(a).save(tmp, format=f, **o), root / name)
    return isic_pairs(root)
