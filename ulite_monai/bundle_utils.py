# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Glue called from the ``ulite`` bundle configs (``$ulite_monai.bundle_utils...`` expressions).

The pipeline (transforms, inferers, engines, handlers) lives in the JSON configs; this module only
finds files, checks them with errors that name the file, and loads/fuses the network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.data import NibabelWriter
from monai.handlers import IgniteMetricHandler
from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric

from ulite_monai.utils import save_atomically

__all__ = [
    "default_bundle_root",
    "load_datalist",
    "list_inputs",
    "load_network",
    "SpacingHausdorffDistanceMetric",
    "SpacingSurfaceDistanceMetric",
    "HD95",
    "MeanSurfaceDistance",
    "AtomicNibabelWriter",
    "report_training",
    "report_evaluation",
]

_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".jpg", ".jpeg", ".png", ".dcm")


def default_bundle_root() -> str:
    """The bundle folder, found without ``__file__`` in the config.

    ``bundles/ulite`` when run from the repository root, ``.`` when run from inside the bundle,
    else the copy next to the installed package (editable installs). Override with ``--bundle_root``.
    """
    if Path("bundles/ulite/configs/metadata.json").is_file():
        return "bundles/ulite"
    if Path("configs/metadata.json").is_file() and Path("configs/inference.json").is_file():
        return "."
    pkg = Path(__file__).resolve().parent.parent / "bundles" / "ulite"
    if (pkg / "configs" / "metadata.json").is_file():
        return str(pkg)
    raise FileNotFoundError(
        "cannot find the ulite bundle folder from the current directory; pass --bundle_root <path/to/bundles/ulite>."
    )


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
    if files and _looks_dicom(files[0]):
        return [{"image": str(p)}]
    subs = [d for d in sorted(p.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    found = [item for d in subs for item in list_inputs(d) if _has_files(d)]
    if not found:
        raise FileNotFoundError(f"no images or DICOM series found in {p}.")
    return found


def _has_files(d: Path) -> bool:
    return any(f.is_file() for f in d.rglob("*"))


def _looks_dicom(f: Path) -> bool:
    try:
        with open(f, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def load_network(
    network_def: torch.nn.Module,
    ckpt_path: str | os.PathLike | None,
    device: str | torch.device = "cpu",
    fuse: bool = True,
) -> torch.nn.Module:
    """Load a bundle checkpoint (``weights_only=True``) into ``network_def``, optionally fuse it.

    Args:
        network_def: the instantiated network (e.g. ``@network_def``).
        ckpt_path: ``models/model.pt``: a state dict or ``{"model": state_dict}`` (CheckpointSaver).
            ``None``/empty leaves the weights as they are.
        device: target device.
        fuse: fold batch norms for inference (``ulite_monai.networks.inference_network``) when the
            network is a ULite; other networks are returned unchanged in eval mode.

    Raises:
        FileNotFoundError: ``ckpt_path`` is given but missing (train first, or pass --ckpt_path).
    """
    if ckpt_path:
        p = Path(ckpt_path)
        if not p.is_file():
            raise FileNotFoundError(
                f"checkpoint not found: {p}. Train first (python -m monai.bundle run training --config_file "
                "bundles/ulite/configs/train.json) or pass --ckpt_path <model.pt>."
            )
        state = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        try:
            network_def.load_state_dict(state)
        except RuntimeError as e:
            raise RuntimeError(f"checkpoint {p} does not match the network in the config: {e}") from e
    net = network_def.to(device).eval()
    if fuse:
        from ulite_monai.networks import ULite, inference_network

        if isinstance(net, ULite):
            net = inference_network(net, fuse=True).to(device).eval()
    return net


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
    """Ignite handler for the 95th-percentile symmetric Hausdorff distance in mm (per case details saved).

    Args:
        include_background: include channel 0.
        output_transform: e.g. ``monai.handlers.from_engine(["pred", "label"])``.
        save_details: keep per-case values for ``MetricsSaver``.
    """

    def __init__(self, include_background: bool = False, output_transform=lambda x: x, save_details: bool = True):
        metric_fn = SpacingHausdorffDistanceMetric(include_background=include_background, percentile=95.0)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class MeanSurfaceDistance(IgniteMetricHandler):
    """Ignite handler for the symmetric mean surface distance in mm (per case details saved).

    Args:
        include_background: include channel 0.
        output_transform: e.g. ``monai.handlers.from_engine(["pred", "label"])``.
        save_details: keep per-case values for ``MetricsSaver``.
    """

    def __init__(self, include_background: bool = False, output_transform=lambda x: x, save_details: bool = True):
        metric_fn = SpacingSurfaceDistanceMetric(include_background=include_background, symmetric=True)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


def report_training(trainer, evaluator, ckpt_dir: str | os.PathLike) -> dict:
    """Print and return the best validation metric, its epoch and where the best model was saved."""
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


class AtomicNibabelWriter(NibabelWriter):
    """``monai.data.NibabelWriter`` that writes to a temporary file in the target folder, then renames it.

    Use with ``SaveImaged(writer=...)`` so an interrupted run never leaves a half-written output.
    """

    def write(self, filename, verbose: bool = False, **obj_kwargs):  # type: ignore[override]
        target = Path(filename)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_atomically(lambda tmp: NibabelWriter.write(self, tmp, verbose=False, **obj_kwargs), target)
        if verbose:
            print(f"file written: {target}.", flush=True)


def report_evaluation(output_dir: str | os.PathLike) -> dict:
    """Print and return the metrics written by ``MetricsSaver`` (``metrics.csv``) and the CSV paths."""
    import csv

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
