# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""One series through the bundle: read (and preprocess), infer, write the outputs, make its manifest row.

A DICOM series enters the bundle's pipeline as an uncompressed NRRD written to the batch's temporary folder
(double-precision geometry, read by the bundle's own reader), so the bundle's chain runs from its first
transform and volume files take the same path. The label comes back on the series grid (the bundle's
``Invertd``); it is reordered to ``[slice, row, column]`` for the SEG. Every file is written under a
temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ulite_monai.batch.plan import WorkItem, item_row
from ulite_monai.bundle import InferencePipeline
from ulite_monai.io.dicom_seg import write_dicom_seg
from ulite_monai.io.dicom_series import SeriesVolume, load_series_volume, sanitize_name
from ulite_monai.utils import save_atomically

__all__ = ["Loaded", "SeriesWorker", "label_array", "to_volume_order", "FORMATS"]

FORMATS = ("seg", "nifti")
_LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass
class Loaded:
    """A work item read and preprocessed (or the error that stopped it), with its timings."""

    item: WorkItem
    volume: SeriesVolume | None = None
    data: dict | None = None
    temp_path: Path | None = None
    read_s: float = 0.0
    preprocess_s: float = 0.0
    error: BaseException | None = None


def label_array(pred: Any) -> np.ndarray:
    """An integer label array (spatial dims only) from the postprocessed prediction."""
    import torch

    arr = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    if arr.ndim == 4:  # channel-first
        arr = arr[0] if arr.shape[0] == 1 else np.argmax(arr, axis=0)
    return np.rint(arr).astype(np.uint8)


def to_volume_order(
    labels_xyz: np.ndarray, pred_affine_ras: np.ndarray, volume_affine_ras: np.ndarray, shape_krc
) -> np.ndarray:
    """Reorder a label array given on ``pred_affine_ras`` onto the series grid ``[slice, row, column]``.

    The two grids must coincide up to axis permutation and flips (what ``Invertd`` restores);
    anything else raises ValueError (a bundle whose postprocessing does not invert its resampling).
    """
    m = np.linalg.inv(volume_affine_ras) @ np.asarray(pred_affine_ras, dtype=np.float64)
    rot = m[:3, :3]
    target_axis, signs = [], []
    for a in range(3):
        b = int(np.argmax(np.abs(rot[:, a])))
        target_axis.append(b)
        signs.append(float(np.sign(rot[b, a])))
    perm_ok = sorted(target_axis) == [0, 1, 2] and np.allclose(np.abs(rot), np.abs(np.round(rot)), atol=1e-3)
    if not perm_ok or not np.allclose(np.abs(np.round(rot)).sum(axis=0), 1):
        raise ValueError(
            "the postprocessed prediction is not on the input grid (no Invertd in the bundle postprocessing?); "
            f"index mapping {np.round(rot, 4).tolist()}"
        )
    arr = np.transpose(labels_xyz, [target_axis.index(b) for b in range(3)])  # axes now (column, row, slice)
    size_crk = (shape_krc[2], shape_krc[1], shape_krc[0])
    if tuple(arr.shape) != tuple(size_crk):
        raise ValueError(f"prediction grid {arr.shape} does not match the series grid {size_crk}")
    for a in range(3):
        b = target_axis[a]
        expected = 0.0 if signs[a] > 0 else size_crk[b] - 1
        if abs(m[b, 3] - expected) > 1e-2:
            raise ValueError(f"prediction grid is shifted against the series grid (axis {b}: {m[b, 3]:.3f} voxels)")
        if signs[a] < 0:
            arr = np.flip(arr, axis=b)
    return np.ascontiguousarray(arr.transpose(2, 1, 0))


class SeriesWorker:
    """Segments one work item at a time with a loaded pipeline and writes its outputs.

    Args:
        pipeline: the bundle's inference pipeline; its ``SaveImaged`` writes into ``staging``.
        output_dir: the batch output folder.
        tmp_dir: the batch's temporary folder (series converted for the reader go there).
        staging: the folder the pipeline's ``SaveImaged`` writes into.
        formats: outputs to write (``seg``, ``nifti``).
        max_gap_ratio: largest/smallest slice gap of a series still resampled.
        software_version: recorded in the SEG.
    """

    def __init__(self, pipeline: InferencePipeline, output_dir: Path, tmp_dir: Path, staging: Path,
                 formats: Sequence[str] = FORMATS, max_gap_ratio: float = 3.0, software_version: str = "") -> None:
        self.pipeline, self.out, self.tmp_dir, self.staging = pipeline, Path(output_dir), Path(tmp_dir), Path(staging)
        self.formats = tuple(formats)
        self.max_gap_ratio = max_gap_ratio
        self.software_version = software_version
        self.segments = pipeline.info.segments()
        self.names = {s.number: s.label for s in self.segments}

    def load(self, item: WorkItem) -> Loaded:
        """Read the item (a DICOM series is converted to a temporary NRRD) and run the bundle's preprocessing.
        Errors are kept in the result, not raised: the batch goes on."""
        res = Loaded(item)
        t = time.perf_counter()
        try:
            image_path = item.path
            if item.kind == "dicom":
                import SimpleITK as sitk

                res.volume = load_series_volume(item.series, max_gap_ratio=self.max_gap_ratio)
                res.temp_path = self.tmp_dir / f"{sanitize_name(item.series.series_uid)}.nrrd"
                sitk.WriteImage(res.volume.to_sitk(), str(res.temp_path), useCompression=False)
                image_path = str(res.temp_path)
            res.read_s = time.perf_counter() - t
            t = time.perf_counter()
            res.data = self.pipeline.preprocess(image_path)
            res.preprocess_s = time.perf_counter() - t
        except BaseException as e:  # reported in the series' row
            res.error = e
        return res

    def process(self, ld: Loaded) -> dict:
        """Infer and write one loaded item; its manifest row (status ``done`` or ``empty``). Raises on failure."""
        if ld.error is not None:
            raise ld.error
        row = item_row(ld.item)
        row["model_version"] = self.pipeline.model_version
        output, model_s, post_s = self.pipeline.infer_and_postprocess(ld.data)
        t = time.perf_counter()
        pred = output[self.pipeline.info.pred_key]
        labels = label_array(pred)
        pred_affine = np.asarray(pred.affine, dtype=np.float64) if hasattr(pred, "affine") else None
        if ld.volume is not None:
            vol = ld.volume
            labels = to_volume_order(labels, pred_affine, vol.affine_ras, vol.array.shape)
            voxel_ml = float(np.prod(vol.spacing)) / 1000.0
            row.update(shape=list(vol.array.shape), spacing_mm=[round(float(v), 6) for v in vol.spacing])
            if vol.notes:
                row["notes"] = vol.notes
        else:
            voxel_ml = abs(float(np.linalg.det(pred_affine[:3, :3]))) / 1000.0 if pred_affine is not None else np.nan
            row["shape"] = list(labels.shape)
        row["volumes_ml"] = {self.names[n]: round(float(np.sum(labels == n)) * voxel_ml, 3) for n in self.names}
        empty = not any(np.any(labels == n) for n in self.names)
        row["outputs"] = self._write(ld, labels, pred_affine, empty)
        row["status"] = "empty" if empty else "done"
        row["reason"] = "no voxel predicted for any label (no SEG written)" if empty else ""
        row["timings_s"] = {"read": round(ld.read_s, 4), "preprocess": round(ld.preprocess_s, 4),
                            "model": round(model_s, 4), "postprocess": round(post_s, 4),
                            "write": round(time.perf_counter() - t, 4)}
        return row

    def _write(self, ld: Loaded, labels: np.ndarray, pred_affine, empty: bool) -> dict[str, str]:
        staged = sorted(p for p in self.staging.rglob("*") if p.is_file())
        final_stem = self.out / ld.item.out_stem
        final_stem.parent.mkdir(parents=True, exist_ok=True)
        outputs: dict[str, str] = {}
        if "nifti" in self.formats:
            outputs["nifti"] = os.path.relpath(self._place_label_file(staged, final_stem, labels, ld, pred_affine),
                                               self.out)
        if "seg" in self.formats and ld.volume is not None and not empty:
            seg = write_dicom_seg(labels, ld.volume, self.segments, final_stem.with_name(final_stem.name + ".seg.dcm"),
                                  algorithm_name=self.pipeline.name, algorithm_version=self.pipeline.version,
                                  software_version=self.software_version)
            outputs["seg"] = os.path.relpath(seg, self.out)
        return outputs

    @staticmethod
    def _place_label_file(staged: list[Path], final_stem: Path, labels: np.ndarray, ld: Loaded, pred_affine) -> Path:
        """Move the label file the bundle's SaveImaged wrote into place; write one if the bundle wrote none."""
        images = [p for p in staged if p.name.lower().endswith(_LABEL_SUFFIXES)]
        if len(images) > 1:
            raise RuntimeError(f"the bundle's postprocessing wrote {len(images)} image files for one input; expected one")
        if images:
            ext = next(e for e in _LABEL_SUFFIXES if images[0].name.lower().endswith(e))
            dest = final_stem.with_name(final_stem.name + ext)
            tmp = dest.with_name(".tmp-" + dest.name)
            shutil.move(str(images[0]), str(tmp))  # same file system: a rename
            os.replace(tmp, dest)
            return dest
        dest = final_stem.with_name(final_stem.name + ".nii.gz")
        if ld.volume is not None:
            import SimpleITK as sitk

            img = sitk.GetImageFromArray(labels.astype(np.uint8))
            img.CopyInformation(ld.volume.to_sitk())
            save_atomically(lambda tmp: sitk.WriteImage(img, tmp, useCompression=True), dest)
        else:
            import nibabel as nib

            nii = nib.Nifti1Image(labels.astype(np.uint8), pred_affine)
            save_atomically(lambda tmp: nib.save(nii, tmp), dest)
        return dest

    def cleanup(self, ld: Loaded) -> None:
        """Remove the item's temporary files and whatever the bundle staged; drop its arrays."""
        if ld.temp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                ld.temp_path.unlink()
        for p in self.staging.rglob("*"):
            if p.is_file():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        ld.data = ld.volume = None
