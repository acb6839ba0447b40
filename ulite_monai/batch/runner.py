# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Clinical batch inference: discover, select, read ahead, infer with the bundle, write, record.

Output layout under the output folder (names from sanitised UIDs, never from tag text)::

    <StudyInstanceUID>/<SeriesInstanceUID>.seg.dcm     DICOM SEG (not written for an empty prediction)
    <StudyInstanceUID>/<SeriesInstanceUID>.nii.gz      label volume in the series geometry
    volumes/<relative path of the input file>.nii.gz   labels for NIfTI/NRRD/MHA inputs
    manifest.jsonl                                     one row per series/file and run (last row wins)
    batch_summary.json                                 counts and timings of the last run

Every file is written to a temporary name in the output tree and renamed into place; the
manifest row is appended after the rename. A rerun skips series already ``done``/``empty`` with
the same model version (bundle name, version and weights hash) unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ulite_monai.batch.manifest import Manifest
from ulite_monai.batch.pipeline import (
    BundlePipeline,
    label_array,
    to_volume_order,
    write_json_atomic,
)
from ulite_monai.io.dicom_seg import segments_from_channel_def, write_dicom_seg
from ulite_monai.io.dicom_series import (
    DicomSeries,
    SeriesRejectedError,
    SeriesVolume,
    discover_inputs,
    load_series_volume,
    sanitize_name,
)
from ulite_monai.io.series_selection import SeriesSelector
from ulite_monai.utils import save_atomically

__all__ = ["BatchOptions", "run_batch"]

logger = logging.getLogger(__name__)
FORMATS = ("seg", "nifti")


@dataclass
class BatchOptions:
    input_dir: Path
    output_dir: Path
    bundle_dir: Path
    config_files: Sequence[Path] | None = None
    rules: dict | None = None  # parsed selection rules; None = every image series
    all_matched: bool | None = None
    device: str = "auto"
    checkpoint: Path | None = None
    allow_random_weights: bool = False
    overwrite: bool = False
    formats: Sequence[str] = FORMATS
    progress: bool = True
    prefetch: bool = True
    fuse: bool = True
    max_gap_ratio: float = 3.0
    overrides: dict = field(default_factory=dict)


@dataclass
class _Item:
    key: str
    kind: str  # "dicom" | "file"
    out_stem: str  # relative output path without extension
    series: DicomSeries | None = None
    path: str | None = None
    selection: str = ""


@dataclass
class _Loaded:
    item: _Item
    volume: SeriesVolume | None = None
    data: dict | None = None
    temp_path: Path | None = None
    read_s: float = 0.0
    preprocess_s: float = 0.0
    error: BaseException | None = None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextlib.contextmanager
def _exclusive(output_dir: Path):
    import fcntl

    lock_path = output_dir / ".ulite-dicom.lock"
    with open(lock_path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another ulite-dicom run is writing to {output_dir}; wait for it or use another output folder"
            ) from None
        yield


def _clean_partial_files(output_dir: Path) -> int:
    """Remove temporaries left by a killed run (they never carry a final name)."""
    n = 0
    tmp = output_dir / ".tmp"
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        n += 1
    for p in output_dir.rglob(".tmp-*"):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


def _series_row(item: _Item) -> dict:
    s = item.series
    row: dict[str, Any] = {"key": item.key, "kind": item.kind}
    if s is not None:
        row.update(
            study_uid=s.study_uid,
            series_uid=s.series_uid,
            modality=s.modality,
            series_description=s.description[:64],
            input=os.path.dirname(s.files[0]) if s.files else "",
            slices=s.num_slices,
        )
    else:
        row.update(input=item.path)
    row["selection"] = item.selection
    return row


class _Prefetcher(threading.Thread):
    """Reads, decodes and preprocesses the next item while the current one infers.

    At most ``slots`` items are alive at once (the one being inferred plus ``slots - 1`` read ahead);
    the consumer frees a slot when it is done with an item.
    """

    def __init__(self, items: list[_Item], load, slots: int = 2) -> None:
        super().__init__(daemon=True, name="ulite-dicom-prefetch")
        self.items, self.load = items, load
        self.slots = threading.Semaphore(slots)
        self.queue: queue.Queue = queue.Queue()
        self.stop = threading.Event()

    def run(self) -> None:
        for item in self.items:
            self.slots.acquire()
            if self.stop.is_set():
                break
            self.queue.put(self.load(item))
        self.queue.put(None)

    def __iter__(self):
        while True:
            loaded = self.queue.get()
            if loaded is None:
                return
            yield loaded

    def release(self) -> None:
        self.slots.release()

    def cancel(self) -> None:
        self.stop.set()
        self.slots.release()


def run_batch(opts: BatchOptions) -> dict:
    """Run a batch; returns the summary (also written to ``batch_summary.json``)."""
    t_start = time.perf_counter()
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    formats = tuple(f.strip().lower() for f in opts.formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"unknown output format(s) {bad}; choose from {FORMATS}")
    with _exclusive(out):
        cleaned = _clean_partial_files(out)
        tmp_dir = out / ".tmp"
        staging = tmp_dir / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(out / "manifest.jsonl")
        pipeline = BundlePipeline(
            opts.bundle_dir,
            staging,
            config_files=opts.config_files,
            device=opts.device,
            checkpoint=opts.checkpoint,
            allow_random_weights=opts.allow_random_weights,
            fuse=opts.fuse,
            overrides=opts.overrides,
        )
        model_version = pipeline.model_version
        segments = segments_from_channel_def(pipeline.channel_def, num_labels=1)
        names = {s.number: s.label for s in segments}

        # ---- discovery and selection ---------------------------------------------------------------
        t0 = time.perf_counter()
        found = discover_inputs(opts.input_dir)
        selector = SeriesSelector(opts.rules, all_matched=opts.all_matched)
        selected, not_selected = selector.select(found.series)
        discovery_s = time.perf_counter() - t0
        counts = {"done": 0, "empty": 0, "skipped": 0, "failed": 0, "already_done": 0}

        def record(row: dict, quiet_repeat: bool = False) -> None:
            counts[row["status"]] += 1
            if quiet_repeat and manifest.same_as_last(row):
                return
            row.setdefault("finished_at", _now())
            manifest.append(row)

        in_root = Path(opts.input_dir)
        for sk in found.skipped:
            rel = os.path.relpath(sk.path, in_root) if in_root.is_dir() else sk.path
            record(
                {
                    "key": sk.key if sk.series_uid else f"file:{rel}",
                    "kind": "file" if not sk.series_uid else "dicom",
                    "study_uid": sk.study_uid,
                    "series_uid": sk.series_uid,
                    "input": rel,
                    "status": "skipped",
                    "reason": sk.reason,
                },
                quiet_repeat=True,
            )
        for s in found.series:
            if s.series_uid in not_selected:
                record(
                    {
                        **_series_row(_Item(s.key, "dicom", "", series=s)),
                        "status": "skipped",
                        "reason": not_selected[s.series_uid],
                    },
                    quiet_repeat=True,
                )

        items: list[_Item] = []
        for sel in selected:
            s = sel.series
            stem = f"{sanitize_name(s.study_uid)}/{sanitize_name(s.series_uid)}"
            items.append(_Item(s.key, "dicom", stem, series=s, selection=sel.selection_name))
        for p in found.volume_files:
            rel = os.path.relpath(p, in_root) if in_root.is_dir() else os.path.basename(p)
            base = rel
            for suf in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
                if base.lower().endswith(suf):
                    base = base[: -len(suf)]
                    break
            stem = "volumes/" + "/".join(sanitize_name(part) for part in Path(base).parts)
            items.append(_Item(f"file:{rel}", "file", stem, path=p, selection="volume file"))
        todo = []
        for it in items:
            if not opts.overwrite and manifest.is_finished(it.key, model_version, out):
                counts["already_done"] += 1
            else:
                todo.append(it)

        # ---- read-ahead loader -----------------------------------------------------------------------
        def load(item: _Item) -> _Loaded:
            res = _Loaded(item)
            t = time.perf_counter()
            try:
                if item.kind == "dicom":
                    import SimpleITK as sitk

                    res.volume = load_series_volume(item.series, max_gap_ratio=opts.max_gap_ratio)
                    res.temp_path = tmp_dir / f"{sanitize_name(item.series.series_uid)}.nrrd"
                    sitk.WriteImage(res.volume.to_sitk(), str(res.temp_path), useCompression=False)
                    image_path = str(res.temp_path)
                else:
                    image_path = item.path
                res.read_s = time.perf_counter() - t
                t = time.perf_counter()
                res.data = pipeline.preprocess(image_path)
                res.preprocess_s = time.perf_counter() - t
            except BaseException as e:  # reported per series; the batch goes on
                res.error = e
            return res

        def process(ld: _Loaded) -> dict:
            item = ld.item
            row = _series_row(item)
            row["model_version"] = model_version
            if ld.error is not None:
                raise ld.error
            output, model_s, post_s = pipeline.infer_and_postprocess(ld.data)
            t = time.perf_counter()
            pred = output[pipeline.pred_key]
            labels = label_array(pred)
            pred_affine = np.asarray(pred.affine, dtype=np.float64) if hasattr(pred, "affine") else None
            staged = sorted(p for p in staging.rglob("*") if p.is_file())
            outputs: dict[str, str] = {}
            if item.kind == "dicom":
                vol = ld.volume
                labels = to_volume_order(labels, pred_affine, vol.affine_ras, vol.array.shape)
                voxel_ml = float(np.prod(vol.spacing)) / 1000.0
                row["shape"] = list(vol.array.shape)
                row["spacing_mm"] = [round(float(v), 6) for v in vol.spacing]
                if vol.notes:
                    row["notes"] = vol.notes
            else:
                voxel_ml = (
                    abs(float(np.linalg.det(pred_affine[:3, :3]))) / 1000.0 if pred_affine is not None else float("nan")
                )
                row["shape"] = list(labels.shape)
            row["volumes_ml"] = {names.get(n, str(n)): round(float(np.sum(labels == n)) * voxel_ml, 3) for n in names}
            empty = not any(np.any(labels == n) for n in names)
            final_stem = out / item.out_stem
            final_stem.parent.mkdir(parents=True, exist_ok=True)
            if "nifti" in formats:
                dest = _place_label_file(staged, final_stem, labels, ld, pred_affine)
                outputs["nifti"] = os.path.relpath(dest, out)
            for p in staged:  # anything else the bundle wrote (or everything when NIfTI is off)
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            if "seg" in formats and item.kind == "dicom" and not empty:
                seg_path = write_dicom_seg(
                    labels,
                    ld.volume,
                    segments,
                    final_stem.with_name(final_stem.name + ".seg.dcm"),
                    algorithm_name=pipeline.name,
                    algorithm_version=pipeline.version,
                    software_version=f"ulite-monai {_package_version()}",
                )
                outputs["seg"] = os.path.relpath(seg_path, out)
            row["outputs"] = outputs
            row["status"] = "empty" if empty else "done"
            row["reason"] = "no voxel predicted for any label (no SEG written)" if empty else ""
            row["timings_s"] = {
                "read": round(ld.read_s, 4),
                "preprocess": round(ld.preprocess_s, 4),
                "model": round(model_s, 4),
                "postprocess": round(post_s, 4),
                "write": round(time.perf_counter() - t, 4),
            }
            return row

        # ---- main loop -------------------------------------------------------------------------------
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="series", desc="ulite-dicom", disable=not opts.progress, dynamic_ncols=True)
        model_total = 0.0
        wait_total = 0.0
        fetch = _Prefetcher(todo, load, slots=2 if opts.prefetch else 1)
        fetch.start()
        t_loop = time.perf_counter()
        try:
            it = iter(fetch)
            while True:
                tw = time.perf_counter()
                ld = next(it, None)
                wait_s = time.perf_counter() - tw
                wait_total += wait_s
                if ld is None:
                    break
                t_item = time.perf_counter()
                try:
                    row = process(ld)
                    row["timings_s"]["wait"] = round(wait_s, 4)
                    row["timings_s"]["total"] = round(time.perf_counter() - t_item + ld.read_s + ld.preprocess_s, 4)
                    model_total += row["timings_s"]["model"]
                except Exception as e:
                    row = _series_row(ld.item)
                    row.update(model_version=model_version, status="failed", reason=_reason(e))
                    bar.write(f"failed: {ld.item.key}: {row['reason']}")
                finally:
                    if ld.temp_path is not None:
                        with contextlib.suppress(FileNotFoundError):
                            ld.temp_path.unlink()
                    for p in staging.rglob("*"):
                        if p.is_file():
                            p.unlink()
                    ld.data = ld.volume = None
                    fetch.release()
                record(row)
                bar.update(1)
                bar.set_postfix({k: v for k, v in counts.items() if v and k != "already_done"}, refresh=False)
        except BaseException:
            fetch.cancel()
            raise
        finally:
            bar.close()
        loop_s = time.perf_counter() - t_loop
        shutil.rmtree(tmp_dir, ignore_errors=True)
        n_run = len(todo)
        summary = {
            "model_version": model_version,
            "device": str(pipeline.device),
            "input": str(opts.input_dir),
            "output": str(out),
            "counts": counts,
            "series_run": n_run,
            "discovery_s": round(discovery_s, 3),
            "loop_s": round(loop_s, 3),
            "wall_s": round(time.perf_counter() - t_start, 3),
            "model_s": round(model_total, 3),
            "waiting_for_reader_s": round(wait_total, 3),
            "model_fraction_of_loop": round(model_total / loop_s, 4) if loop_s > 0 else None,
            "series_per_minute": round(60.0 * n_run / loop_s, 2) if loop_s > 0 and n_run else None,
            "cleaned_partial_files": cleaned,
            "torn_manifest_lines": manifest.torn_lines,
        }
        write_json_atomic(out / "batch_summary.json", summary)
        return summary


def _reason(e: BaseException) -> str:
    if isinstance(e, (SeriesRejectedError, FileNotFoundError, ValueError, RuntimeError)):
        text = str(e).strip().splitlines()
        return (text[-1] if isinstance(e, RuntimeError) and "Traceback" in str(e) else " ".join(text))[:500] or type(
            e
        ).__name__
    return f"{type(e).__name__}: {e}"[:500]


def _package_version() -> str:
    from ulite_monai import __version__

    return __version__


def _place_label_file(staged: list[Path], final_stem: Path, labels: np.ndarray, ld: _Loaded, pred_affine) -> Path:
    """Move the label file the bundle's SaveImaged wrote into place; write one if the bundle wrote none."""
    images = [p for p in staged if p.name.lower().endswith((".nii.gz", ".nii", ".nrrd", ".mha"))]
    if len(images) == 1:
        src = images[0]
        ext = next(e for e in (".nii.gz", ".nii", ".nrrd", ".mha") if src.name.lower().endswith(e))
        dest = final_stem.with_name(final_stem.name + ext)
        tmp = dest.with_name(".tmp-" + dest.name)
        shutil.move(str(src), str(tmp))  # same file system: a rename
        os.replace(tmp, dest)
        return dest
    if len(images) > 1:
        raise RuntimeError(f"the bundle's postprocessing wrote {len(images)} image files for one input; expected one")
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
