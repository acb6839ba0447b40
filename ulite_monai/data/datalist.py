# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Dataset layouts and inference inputs as MONAI datalists (``[{"image": ..., "label": ...}]``)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import IterableDataset

from ulite_monai.io.image2d import is_dicom_file

__all__ = ["load_datalist", "list_inputs", "SkipBadItems"]

_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".jpg", ".jpeg", ".png", ".dcm")


def _check_files(items: list[dict], keys: Sequence[str], source: str) -> list[dict]:
    for item in items:
        for k in keys:
            if k in item and not Path(item[k]).exists():
                raise FileNotFoundError(f"{k} file listed in {source} does not exist: {item[k]}")
    return items


def load_datalist(
    dataset_dir: str | os.PathLike,
    split: str = "training",
    demo: str | None = None,
    datalist_file: str | None = None,
    val_fraction: float = 0.2,
) -> list[dict]:
    """Items ``{"image": path, "label": path}`` (absolute paths) of one split of a dataset folder.

    Layouts understood, first match wins:

    1. ``datalist_file`` or ``<dataset_dir>/datalist.json``: MONAI/Decathlon-style JSON with lists under
       ``"training"``, ``"validation"``, ``"testing"`` (paths relative to the folder or absolute);
    2. an ISIC-2018-style folder (``*.jpg`` + ``*_segmentation.png``), split by :func:`isic_split`;
    3. Decathlon folders ``imagesTr/`` + ``labelsTr/`` with matching names (every 5th case validates).

    Args:
        dataset_dir: the dataset folder.
        split: ``"training"``, ``"validation"`` or ``"testing"``.
        demo: ``"3d"`` or ``"isic2d"`` to generate that demo set when the folder is missing or empty;
            ``None`` to require existing data.
        datalist_file: explicit datalist JSON (else ``datalist.json`` in the folder).
        val_fraction: validation share for layouts without an explicit split.
    """
    from monai.data import load_decathlon_datalist

    root = Path(dataset_dir)
    empty = not root.exists() or not any(p for p in root.iterdir() if not p.name.startswith("."))
    if demo == "3d":
        from ulite_monai.data.demo import ensure_demo_dataset

        ensure_demo_dataset(root)
    elif demo == "isic2d" and empty:
        from ulite_monai.data.isic import generate_isic_demo

        generate_isic_demo(root)
    elif demo not in (None, "", "none", "3d", "isic2d"):
        raise ValueError(f"unknown demo data kind {demo!r}: use '3d', 'isic2d' or null.")
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset folder not found: {root}. Set dataset_dir to your data (datalist.json, imagesTr/labelsTr "
            "or an ISIC-style folder), or leave it empty with the demo switch on to generate the demo set."
        )
    dl = Path(datalist_file) if datalist_file else root / "datalist.json"
    if dl.is_file():
        try:
            with open(dl) as f:
                keys = json.load(f).keys()
        except json.JSONDecodeError as e:
            raise ValueError(f"datalist {dl} is not valid JSON: {e}") from e
        if split not in keys:
            raise KeyError(f"datalist {dl} has no '{split}' list (keys: {sorted(keys)}).")
        items = load_decathlon_datalist(str(dl), is_segmentation=True, data_list_key=split, base_dir=str(root))
        return _check_files(items, ("image", "label"), str(dl))
    from ulite_monai.data.isic import is_isic_folder, isic_pairs, isic_split

    if is_isic_folder(root):
        return isic_split(isic_pairs(root), val_fraction=val_fraction)[split]
    images, labels = root / "imagesTr", root / "labelsTr"
    if images.is_dir() and labels.is_dir():
        pairs = []
        for img in sorted(p for p in images.iterdir() if p.name.endswith(_IMAGE_SUFFIXES)):
            lab = labels / img.name
            if not lab.exists():
                raise FileNotFoundError(f"no label for {img}: expected {lab}.")
            pairs.append({"image": str(img.resolve()), "label": str(lab.resolve())})
        step = max(2, int(round(1 / max(val_fraction, 1e-6))))
        val = [p for i, p in enumerate(pairs) if i % step == step - 1]
        train = [p for i, p in enumerate(pairs) if i % step != step - 1]
        return {"training": train, "validation": val, "testing": []}[split]
    raise FileNotFoundError(
        f"dataset folder {root} has no datalist.json, no ISIC-style *_segmentation.png masks and no "
        "imagesTr/labelsTr folders: see bundles/ulite/docs/README.md (Data format)."
    )


def list_inputs(path: str | os.PathLike | Sequence[str]) -> list[dict]:
    """Inference inputs ``[{"image": ...}]`` from a file, a folder of files, or DICOM series folders.

    * an image file: that file;
    * a folder with image files (NIfTI, NRRD, MHA, ...): each file, sorted;
    * a folder of DICOM slices: the folder itself (one series, read by ``SITKReader``);
    * a folder whose subfolders hold DICOM slices: each subfolder;
    * a list of any of these.
    """
    if isinstance(path, (list, tuple)):
        return [item for p in path for item in list_inputs(p)]
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"inference input not found: {p}. Pass --input <file or folder>.")
    if p.is_file():
        return [{"image": str(p)}]
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    images = [f for f in files if f.name.lower().endswith(_IMAGE_SUFFIXES) and not f.name.lower().endswith(".dcm")]
    if images:
        return [{"image": str(f)} for f in images]
    if files and is_dicom_file(files[0]):
        return [{"image": str(p)}]
    subs = [d for d in sorted(p.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    found = [item for d in subs for item in list_inputs(d) if _has_files(d)]
    if not found:
        raise FileNotFoundError(f"no images or DICOM series found in {p}.")
    return found


class SkipBadItems(IterableDataset):
    """Items of ``data`` through ``transform``; an item whose transform fails is logged and skipped.

    For inference over a folder: one unreadable or truncated file must not stop the others. Each failure is
    logged with the file and the underlying error (not MONAI's "applying transform" wrapper) and, with
    ``errors_file``, appended there as a JSON line ``{"image": ..., "error": ...}``. Iterate in one process
    (``num_workers=0``).
    """

    def __init__(self, data: Sequence[dict], transform, errors_file: str | None = None) -> None:
        super().__init__()
        self.data, self.transform, self.errors_file = list(data), transform, errors_file
        self.failed: list[dict] = []

    def __iter__(self):
        for item in self.data:
            try:
                yield self.transform(item)
            except Exception as e:
                while e.__cause__ is not None and str(e).startswith("applying transform"):
                    e = e.__cause__
                entry = {"image": str(item.get("image")), "error": f"{type(e).__name__}: {e}"}
                self.failed.append(entry)
                logging.getLogger("ulite_monai.data").error("skipped %s: %s", entry["image"], entry["error"])
                if self.errors_file:
                    os.makedirs(os.path.dirname(os.path.abspath(self.errors_file)), exist_ok=True)
                    with open(self.errors_file, "a", encoding="utf-8") as f:
                        f.write(json.dumps(entry) + "\n")


def _has_files(d: Path) -> bool:
    return any(f.is_file() for f in d.rglob("*"))

