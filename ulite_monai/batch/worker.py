# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""One series (or 2D image) through the bundle: read (and preprocess), infer, write the outputs, make its row.

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
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ulite_monai.batch.plan import OUTPUT_SUFFIXES, WorkItem, failed_row, failure_reason, item_row
from ulite_monai.batch.remote import remove_download
from ulite_monai.batch.qc import ConfidenceProbe, ReviewRules, review_reasons, write_preview
from ulite_monai.bundle import InferencePipeline
from ulite_monai.io.dicom_seg import build_dicom_seg, build_dicom_seg_2d
from ulite_monai.io.dicom_series import POSITION_TOLERANCE, SeriesVolume, load_series_volume
from ulite_monai.io.rtstruct import write_rtstruct
from ulite_monai.io.sr import write_volume_report
from ulite_monai.utils import save_atomically

__all__ = ["Loaded", "SeriesWorker", "run_series", "label_array", "to_volume_order", "FORMATS", "DEFAULT_FORMATS"]

FORMATS = ("seg", "nifti", "rtstruct", "sr", "qc")
DEFAULT_FORMATS = ("seg", "nifti", "qc")
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


def label_array(pred: Any, spatial_dims: int = 3) -> np.ndarray:
    """An integer label array (spatial dims only) from the postprocessed prediction."""
    import torch

    arr = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    if arr.ndim == spatial_dims + 1:  # channel-first
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
        formats: outputs to write (:data:`FORMATS`: ``seg``, ``nifti``, ``rtstruct``, ``sr``, ``qc``).
        max_gap_ratio: largest/smallest slice gap of a series still resampled.
        software_version: recorded in the DICOM outputs.
        position_tolerance: plane position scatter/drift tolerated, as a fraction of the pixel spacing.
        seg_type: ``binary`` or ``labelmap`` SEG.
        review: thresholds of the ``needs_review`` flag.
        fetch: called with a work item before it is read (e.g. a PACS download); returns the item to read.
    """

    def __init__(self, pipeline: InferencePipeline, output_dir: Path, tmp_dir: Path, staging: Path,
                 formats: Sequence[str] = DEFAULT_FORMATS, max_gap_ratio: float = 3.0, software_version: str = "",
                 position_tolerance: float = POSITION_TOLERANCE, seg_type: str = "binary",
                 review: ReviewRules | None = None, fetch: Callable[[WorkItem], WorkItem] | None = None) -> None:
        self.pipeline, self.out, self.tmp_dir, self.staging = pipeline, Path(output_dir), Path(tmp_dir), Path(staging)
        self.formats = tuple(formats)
        self.max_gap_ratio, self.position_tolerance = max_gap_ratio, position_tolerance
        self.software_version, self.seg_type = software_version, seg_type
        self.review = review or ReviewRules()
        self.fetch = fetch
        self.segments = pipeline.info.segments()
        self.names = {s.number: s.label for s in self.segments}
        self.probe = ConfidenceProbe(pipeline)

    def load(self, item: WorkItem) -> Loaded:
        """Read the item (a DICOM series is converted to a temporary NRRD) and run the bundle's preprocessing.
        Errors are kept in the result, not raised: the batch goes on."""
        res = Loaded(item)
        t = time.perf_counter()
        try:
            if self.fetch is not None:
                res.item = item = self.fetch(item)
            image_path = item.path
            if item.kind == "dicom":
                import SimpleITK as sitk

                res.volume = load_series_volume(item.series, self.max_gap_ratio, self.position_tolerance)
                res.temp_path = self.tmp_dir / f"{uuid.uuid4().hex}.nrrd"  # unique: one UID may be in two studies
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
        conf = dict(self.probe.last)
        t = time.perf_counter()
        pred = output[self.pipeline.info.pred_key]
        if ld.item.kind in ("image", "dicom2d") or self.pipeline.info.spatial_dims == 2:
            row.update(self._image_result(ld, pred, conf))
            row["timings_s"] = {"read": round(ld.read_s, 4), "preprocess": round(ld.preprocess_s, 4),
                                "model": round(model_s, 4), "postprocess": round(post_s, 4),
                                "write": round(time.perf_counter() - t, 4)}
            return row
        labels = label_array(pred)
        pred_affine = np.asarray(pred.affine, dtype=np.float64) if hasattr(pred, "affine") else None
        vol = ld.volume
        if vol is not None:
            labels = to_volume_order(labels, pred_affine, vol.affine_ras, vol.array.shape)
            voxel_ml = float(np.prod(vol.spacing)) / 1000.0
            row.update(shape=list(vol.array.shape), spacing_mm=[round(float(v), 6) for v in vol.spacing],
                       geometry=vol.geometry)
            if vol.notes:
                row["notes"] = vol.notes
        else:
            voxel_ml = abs(float(np.linalg.det(pred_affine[:3, :3]))) / 1000.0 if pred_affine is not None else np.nan
            row["shape"] = list(labels.shape)
        row["volumes_ml"] = {self.names[n]: round(float(np.sum(labels == n)) * voxel_ml, 3) for n in self.names}
        empty = not any(np.any(labels == n) for n in self.names)
        reasons = review_reasons(labels, self.names, conf, bool(vol is not None and vol.resampled), self.review)
        row.update(needs_review=bool(reasons), review_reasons=reasons, confidence=conf)
        row["outputs"], extra = self._write(ld, labels, pred_affine, empty, reasons)
        row.update(extra)
        row["status"] = "empty" if empty else "done"
        row["reason"] = "no voxel predicted for any label (no SEG written)" if empty else ""
        row["timings_s"] = {"read": round(ld.read_s, 4), "preprocess": round(ld.preprocess_s, 4),
                            "model": round(model_s, 4), "postprocess": round(post_s, 4),
                            "write": round(time.perf_counter() - t, 4)}
        if ld.item.remote:
            row["timings_s"]["download"] = round(ld.item.download_s, 4)  # part of "read"
            row["downloaded_bytes"] = ld.item.downloaded_bytes
        return row

    def _write(self, ld: Loaded, labels: np.ndarray, pred_affine, empty: bool, reasons: list[str]):
        """Write the requested outputs; their paths (relative to the output folder) and extra row fields.
        Whatever this key had before and did not write now (an older SEG beside a new empty result) goes."""
        staged = sorted(p for p in self.staging.rglob("*") if p.is_file())
        stem = self.out / ld.item.out_stem
        stem.parent.mkdir(parents=True, exist_ok=True)
        outputs: dict[str, Path] = {}
        extra: dict[str, Any] = {}
        if "nifti" in self.formats:
            outputs["nifti"] = self._place_label_file(staged, stem, labels, ld, pred_affine)
        vol, info = ld.volume, self.pipeline
        dicom_out = vol is not None and not empty
        if dicom_out and "seg" in self.formats:
            seg = build_dicom_seg(labels, vol, self.segments, info.name, info.version, seg_type=self.seg_type,
                                  software_version=self.software_version)
            outputs["seg"] = stem.with_name(stem.name + ".seg.dcm")
            save_atomically(seg.save_as, outputs["seg"])
            extra.update(seg_type=self.seg_type, seg_frames=int(seg.NumberOfFrames))
            if "sr" in self.formats:
                sr_path = stem.with_name(stem.name + ".sr.dcm")
                outputs["sr"] = write_volume_report(seg, labels, vol, self.segments, sr_path, info.name, info.version)
        if dicom_out and "rtstruct" in self.formats:
            rt = write_rtstruct(labels, vol, self.segments, stem.with_name(stem.name + ".rtstruct.dcm"), info.name,
                                info.version)
            if rt is not None:
                outputs["rtstruct"] = rt
        if "qc" in self.formats:
            image, lab, spacing = self._preview_arrays(ld, labels)
            title = f"{ld.item.key}  " + ("NEEDS REVIEW: " + "; ".join(reasons) if reasons else "no review flag")
            outputs["qc"] = write_preview(image, lab, spacing, stem.with_name(stem.name + ".qc.png"), title)
        rel = {k: os.path.relpath(v, self.out) for k, v in outputs.items()}
        self.remove_outputs(ld.item, keep=rel.values())
        return rel, extra

    def _image_result(self, ld: Loaded, pred, conf: dict) -> dict:
        """Outputs and row fields of a 2D image: the bundle's mask (and overlay) moved into place, a SEG that
        references a DICOM source, areas in pixels (and mm² where the image has a pixel spacing)."""
        labels = label_array(pred, 2).T  # (x, y) as MONAI reads images -> (rows, columns)
        meta = getattr(pred, "meta", {}) or {}
        px = np.abs(np.diag(np.asarray(pred.affine, dtype=np.float64))[:2]) if hasattr(pred, "affine") else (1, 1)
        row: dict[str, Any] = {"shape": list(labels.shape)}
        row["areas_px"] = {self.names[n]: int(np.sum(labels == n)) for n in self.names}
        if meta.get("spacing_known"):
            row["areas_mm2"] = {k: round(v * float(px[0] * px[1]), 3) for k, v in row["areas_px"].items()}
        empty = not any(row["areas_px"].values())
        reasons = review_reasons(labels, self.names, conf, False, self.review)
        row.update(needs_review=bool(reasons), review_reasons=reasons, confidence=conf)
        stem = self.out / ld.item.out_stem
        stem.parent.mkdir(parents=True, exist_ok=True)
        outputs: dict[str, Path] = {}
        for p in sorted(q for q in self.staging.rglob("*") if q.is_file()):
            overlay = p.name.lower().endswith(("_overlay.png", "_overlay.jpg"))
            key, dest = ("overlay", stem.with_name(stem.name + ".overlay" + p.suffix)) if overlay else (
                "mask", stem.with_name(stem.name + (".nii.gz" if p.name.lower().endswith(".nii.gz") else p.suffix)))
            if key in outputs:
                raise RuntimeError(f"the bundle's postprocessing wrote several {key} files for one input; expected one")
            tmp = dest.with_name(".tmp-" + dest.name)
            shutil.move(str(p), str(tmp))  # same file system: a rename
            os.replace(tmp, dest)
            outputs[key] = dest
        if "mask" not in outputs:
            from PIL import Image

            outputs["mask"] = stem.with_name(stem.name + ".png")
            save_atomically(lambda tmp: Image.fromarray((labels > 0).astype(np.uint8) * 255).save(tmp, "PNG"),
                            outputs["mask"])
        if ld.item.kind == "dicom2d" and "seg" in self.formats and not empty:
            import pydicom

            seg = build_dicom_seg_2d(labels, pydicom.dcmread(ld.item.path), self.segments, self.pipeline.name,
                                     self.pipeline.version, seg_type=self.seg_type,
                                     software_version=self.software_version)
            outputs["seg"] = stem.with_name(stem.name + ".seg.dcm")
            save_atomically(seg.save_as, outputs["seg"])
            row.update(seg_type=self.seg_type, seg_frames=int(seg.NumberOfFrames))
        rel = {k: os.path.relpath(v, self.out) for k, v in outputs.items()}
        self.remove_outputs(ld.item, keep=rel.values())
        row.update(outputs=rel, status="empty" if empty else "done",
                   reason="no pixel predicted for any label (no SEG written)" if empty else "")
        return row

    def run(self, ld: Loaded, remove_failed: bool = True) -> dict:
        """:func:`run_series` with this worker."""
        return run_series(self, ld, remove_failed)

    def remove_outputs(self, item: WorkItem, keep=()) -> None:
        """Delete this item's earlier outputs (its last row's, and any output name at its stem) except ``keep``."""
        keep = {os.path.normpath(k) for k in keep}
        candidates = set(item.previous_outputs) | {item.out_stem + suf for suf in OUTPUT_SUFFIXES}
        for rel in candidates:
            if os.path.normpath(rel) not in keep:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    (self.out / rel).unlink()

    @staticmethod
    def _preview_arrays(ld: Loaded, labels: np.ndarray):
        """Image, labels ([slice, row, column]) and (column, row, slice) spacing for the preview."""
        if ld.volume is not None:
            return ld.volume.array, labels, ld.volume.spacing
        from ulite_monai.io.sitk_reader import read_sitk_image
        import SimpleITK as sitk

        img = read_sitk_image(ld.item.path)
        arr = sitk.GetArrayFromImage(img)
        arr = arr if arr.ndim == 3 else arr.reshape((1,) * (3 - arr.ndim) + arr.shape[-2:])
        lab = labels.transpose(2, 1, 0) if labels.ndim == 3 else labels.T[None]
        return arr, lab, img.GetSpacing()[:3] if img.GetDimension() >= 3 else (*img.GetSpacing(), 1.0)

    @staticmethod
    def _place_label_file(staged: list[Path], final_stem: Path, labels: np.ndarray, ld: Loaded, pred_affine) -> Path:
        """Move the label file the bundle's SaveImaged wrote into place; write one if the bundle wrote none."""
        images = [p for p in staged if p.name.lower().endswith(_LABEL_SUFFIXES)]
        if len(images) > 1:
            raise RuntimeError(
                f"the bundle's postprocessing wrote {len(images)} image files for one input; expected one")
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
        """Remove the item's temporary files (a downloaded series too) and whatever the bundle staged."""
        remove_download(ld.item)
        if ld.temp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                ld.temp_path.unlink()
        for p in self.staging.rglob("*"):
            if p.is_file():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        ld.data = ld.volume = None


def run_series(worker, ld: Loaded, remove_failed: bool = True) -> dict:
    """``worker.process(ld)`` for the batch loops, where one bad series never stops the others: its row, or on any
    error a ``failed`` row with the reason (and, with ``remove_failed``, the item's earlier outputs deleted through
    ``worker.remove_outputs``, so no earlier model's result stays beside a failure). ``worker.cleanup(ld)`` runs
    either way. A row's ``timings_s["total"]`` counts reading, preprocessing and processing.

    ``worker`` is a :class:`SeriesWorker` or anything with its ``process``, ``remove_outputs``, ``cleanup`` and
    ``pipeline`` (the shard runner's committing wrapper).
    """
    t = time.perf_counter()
    try:
        row = worker.process(ld)
        row["timings_s"]["total"] = round(time.perf_counter() - t + ld.read_s + ld.preprocess_s, 4)
    except Exception as e:  # noqa: BLE001 - recorded in the manifest row
        row = failed_row(ld.item, worker.pipeline.model_version, failure_reason(e))
        if remove_failed:
            with contextlib.suppress(OSError):
                worker.remove_outputs(ld.item)
    finally:
        worker.cleanup(ld)
    return row
