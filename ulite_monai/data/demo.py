# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The embedded 3D demo dataset: synthetic CT-like volumes with one foreground structure.

Generated deterministically (seeded per case) on first use, so a fresh clone can train, evaluate
and run inference with no download. The task is not trivial on purpose:

* every case has its own grid size, voxel spacing (anisotropic), origin and a rotated, sometimes
  axis-flipped direction matrix (non-identity affine, LPS- and RAS-like cases mixed);
* intensities are in Hounsfield-like units (air -1000, fat about -100, soft tissue 20-60);
* the target is a lobulated blob (union of rotated ellipsoids) of varied size and position whose
  intensity overlaps with "distractor" structures of other shapes and sizes;
* Gaussian noise, a smooth multiplicative bias field and partial-volume blur are applied.

Layout written under ``dataset_dir``::

    imagesTr/case_000.nii.gz  labelsTr/case_000.nii.gz  ...   (train + validation cases)
    imagesTs/test_000.nii.gz  ...                                (unlabelled inference inputs)
    datalist.json   {"training": [...], "validation": [...], "testing": [...]}  (paths relative)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ulite_monai.utils import save_atomically, save_json_atomically

__all__ = ["DEMO_VERSION", "generate_demo_dataset", "make_demo_case", "ensure_demo_dataset"]

DEMO_VERSION = 1
_DATALIST = "datalist.json"


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A random rotation (axis-angle) of at most ``max_deg`` degrees."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _ellipsoid(coords: np.ndarray, centre, radii, rot: np.ndarray) -> np.ndarray:
    """Soft-edged ellipsoid indicator (values in [0, 1]) on physical coordinates ``coords`` (3, ...)."""
    d = np.tensordot(rot.T, coords - np.asarray(centre, dtype=np.float32).reshape(3, 1, 1, 1), axes=1)
    r = np.sqrt(sum((d[i] / radii[i]) ** 2 for i in range(3)))
    return np.clip((1.0 - r) * 6.0 + 0.5, 0.0, 1.0)  # about one voxel of smooth edge


def _smooth_field(rng: np.random.Generator, coords: np.ndarray, extent: float, amplitude: float) -> np.ndarray:
    """A smooth multiplicative field ``1 + sum of low-frequency cosines`` (bias-field-like)."""
    field = np.zeros(coords.shape[1:], dtype=np.float32)
    for _ in range(3):
        k = rng.normal(size=3) * (2 * np.pi / (2.0 * extent))
        phase = rng.uniform(0, 2 * np.pi)
        field += np.cos(np.tensordot(k, coords, axes=1) + phase).astype(np.float32)
    return 1.0 + amplitude * field / 3.0


def _blur(arr: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1]/4 blur along every axis (partial-volume effect)."""
    out = arr
    for ax in range(arr.ndim):
        p = np.pad(out, [(1, 1) if i == ax else (0, 0) for i in range(arr.ndim)], mode="edge")
        sl = [slice(None)] * arr.ndim

        def take(a, b):
            sl[ax] = slice(a, p.shape[ax] - b)
            return p[tuple(sl)]

        out = 0.25 * take(0, 2) + 0.5 * take(1, 1) + 0.25 * take(2, 0)
    return out


def make_demo_case(seed: int, with_label: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make one synthetic case.

    Args:
        seed: case seed; the same seed always gives the same arrays and affine.
        with_label: unused for generation (the label is always made); kept for symmetry.

    Returns:
        ``(image int16 (X, Y, Z) in HU, label uint8 (X, Y, Z) in {0, 1}, affine 4x4 RAS)``.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(64, 93, size=3))
    spacing = np.array([rng.uniform(1.5, 2.0), rng.uniform(1.5, 2.0), rng.uniform(1.8, 2.5)])
    flips = np.diag([rng.choice([-1.0, 1.0]), rng.choice([-1.0, 1.0]), 1.0])  # LPS/RAS-like mixes
    direction = _rotation(rng, 15.0) @ flips
    origin = rng.uniform(-150, 150, size=3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = origin

    # physical coordinates relative to the volume centre, in mm, in the voxel frame (rotation-free:
    # anatomy is defined in the scanner's voxel frame so that each case's content is what the affine says)
    idx = np.indices(shape, dtype=np.float32)
    centre_vox = (np.asarray(shape, dtype=np.float32) - 1) / 2
    coords = (idx - centre_vox.reshape(3, 1, 1, 1)) * spacing.astype(np.float32).reshape(3, 1, 1, 1)
    half = np.asarray(shape) * spacing / 2

    # body: air outside, a fat rim, soft tissue inside
    body_r = half * rng.uniform(0.8, 0.95, size=3)
    body_r[2] = half[2] * 1.6  # the body runs through the whole field of view along z
    body = _ellipsoid(coords, (0, 0, 0), body_r, np.eye(3))
    inner = _ellipsoid(coords, (0, 0, 0), body_r - rng.uniform(6, 12), np.eye(3))
    tissue_hu = rng.uniform(20, 60)
    img = -1000.0 * (1 - body) + body * (-100.0 * (1 - inner) + tissue_hu * inner)

    # target: lobulated blob made of 2-4 rotated ellipsoids around a common centre
    t_centre = rng.uniform(-0.3, 0.3, size=3) * body_r
    size = rng.uniform(20, 32)
    target = np.zeros(shape, dtype=np.float32)
    for _ in range(int(rng.integers(2, 5))):
        c = t_centre + rng.normal(scale=size * 0.35, size=3)
        radii = size * rng.uniform(0.5, 1.1, size=3)
        target = np.maximum(target, _ellipsoid(coords, c, radii, _rotation(rng, 90)))
    target *= inner
    target_hu = rng.uniform(100, 150)

    # distractors: spheres/tubes whose intensity overlaps the target's
    distract = np.zeros(shape, dtype=np.float32)
    distract_img = np.zeros(shape, dtype=np.float32)
    for _ in range(int(rng.integers(2, 5))):
        c = rng.uniform(-0.6, 0.6, size=3) * body_r
        if rng.random() < 0.5:  # small round nodule
            r = np.full(3, rng.uniform(4, 8))
        else:  # elongated vessel-like tube
            r = np.array([rng.uniform(3, 5), rng.uniform(3, 5), rng.uniform(25, 60)])
        d = _ellipsoid(coords, c, r, _rotation(rng, 60)) * inner * (1 - np.clip(target * 2, 0, 1))
        hu = rng.uniform(70, 160)
        distract_img = np.where(d > distract, hu, distract_img)
        distract = np.maximum(distract, d)

    texture = _blur(_blur(rng.normal(scale=12.0, size=shape).astype(np.float32)))
    img = img * (1 - target) + (target_hu + texture) * target
    img = img * (1 - distract) + distract_img * distract
    bias = _smooth_field(rng, coords, float(half.max()), amplitude=0.15)
    img = np.where(img > -500, img * bias, img)  # bias acts on tissue, not on air
    img = _blur(img) + rng.normal(scale=rng.uniform(10, 18), size=shape)
    image = np.clip(np.round(img), -1024, 3071).astype(np.int16)
    label = (target > 0.5).astype(np.uint8)
    return image, label, affine


def _atomic_save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    nii = nib.Nifti1Image(arr, affine)
    nii.set_qform(affine, code=1)
    nii.set_sform(affine, code=1)
    nii.header.set_xyzt_units("mm")
    save_atomically(lambda tmp: nib.save(nii, tmp), path)


def generate_demo_dataset(
    dataset_dir: str | os.PathLike,
    num_train: int = 16,
    num_val: int = 4,
    num_test: int = 2,
    seed: int = 20230616,
) -> Path:
    """Write the demo dataset into ``dataset_dir`` (created if needed) and return the datalist path.

    Args:
        dataset_dir: output folder.
        num_train: number of labelled training cases.
        num_val: number of labelled validation cases.
        num_test: number of unlabelled inference inputs under ``imagesTs``.
        seed: base seed; case ``i`` uses ``seed + i``.
    """
    root = Path(dataset_dir)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(num_train + num_val):
        image, label, affine = make_demo_case(seed + i)
        img_rel, lab_rel = f"imagesTr/case_{i:03d}.nii.gz", f"labelsTr/case_{i:03d}.nii.gz"
        _atomic_save_nifti(image, affine, root / img_rel)
        _atomic_save_nifti(label, affine, root / lab_rel)
        items.append({"image": img_rel, "label": lab_rel})
    tests = []
    for j in range(num_test):
        image, _, affine = make_demo_case(seed + 10_000 + j)
        rel = f"imagesTs/test_{j:03d}.nii.gz"
        _atomic_save_nifti(image, affine, root / rel)
        tests.append({"image": rel})
    datalist = {
        "name": "ulite synthetic demo",
        "description": "Synthetic CT-like volumes generated by ulite_monai.data.demo (deterministic).",
        "demo_version": DEMO_VERSION,
        "seed": seed,
        "labels": {"0": "background", "1": "foreground"},
        "training": items[:num_train],
        "validation": items[num_train:],
        "testing": tests,
    }
    out = root / _DATALIST
    save_json_atomically(datalist, out)  # written last: its presence means the set is complete
    return out


def ensure_demo_dataset(dataset_dir: str | os.PathLike, **kwargs) -> Path:
    """Generate the demo dataset if ``dataset_dir`` is missing or empty; return its datalist path.

    Safe when several processes (e.g. torchrun ranks) call it at once: one generates under a file
    lock, the others wait and reuse the result.

    Args:
        dataset_dir: the dataset folder.
        kwargs: passed to :func:`generate_demo_dataset`.
    """
    root = Path(dataset_dir)
    root.mkdir(parents=True, exist_ok=True)
    datalist = root / _DATALIST
    lock_path = root.parent / f".{root.name}.lock"
    import fcntl

    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if datalist.exists():
                return datalist
            visible = [p for p in root.iterdir() if not p.name.startswith(".")]
            if any(p.is_file() for p in visible) or any(any(d.iterdir()) for d in visible if d.is_dir()):
                raise FileNotFoundError(
                    f"dataset folder {root} is not empty but has no {_DATALIST}: either point dataset_dir at an "
                    "empty folder to generate the demo data, or add a datalist.json with 'training'/'validation' "
                    "lists of {'image': ..., 'label': ...} (paths relative to the folder)."
                )
            return generate_demo_dataset(root, **kwargs)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
