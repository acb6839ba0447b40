# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Clinical batch inference: plan, then segment each series with the bundle, reading ahead, recording each.

Output layout under the output folder (names from sanitised UIDs, never from tag text)::

    <StudyInstanceUID>/<SeriesInstanceUID>.seg.dcm     DICOM SEG (not written for an empty prediction)
    <StudyInstanceUID>/<SeriesInstanceUID>.nii.gz      label volume in the series geometry
    volumes/<relative path of the input file>.nii.gz   labels for NIfTI/NRRD/MHA inputs
    manifest.jsonl                                     one row per series/file and run (last row wins)
    batch_summary.json                                 counts and timings of the last run

The manifest row is appended after the outputs are renamed into place. A rerun skips series already
``done``/``empty`` with the same model version (bundle name, version and weights hash) unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ulite_monai.batch.manifest import Manifest
from ulite_monai.batch.plan import item_row, plan_batch
from ulite_monai.batch.prefetch import Prefetcher
from ulite_monai.batch.worker import FORMATS, SeriesWorker
from ulite_monai.bundle import Bundle
from ulite_monai.io.dicom_series import SeriesRejectedError
from ulite_monai.utils import save_json_atomically

__all__ = ["BatchOptions", "run_batch", "failure_reason"]


@dataclass
class BatchOptions:
    """What ``ulite-dicom`` was asked to do (see ``ulite-dicom --help``). ``fuse``/``amp`` ``None``: the
    bundle config's ``use_fused``/``amp``; ``config_files``: override files merged onto inference.json."""

    input_dir: Path
    output_dir: Path
    bundle_dir: Path | None = None
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
    fuse: bool | None = None
    amp: bool | None = None
    max_gap_ratio: float = 3.0
    overrides: dict = field(default_factory=dict)


@contextlib.contextmanager
def _exclusive(output_dir: Path):
    import fcntl

    with open(output_dir / ".ulite-dicom.lock", "w") as f:
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
    if (output_dir / ".tmp").exists():
        shutil.rmtree(output_dir / ".tmp", ignore_errors=True)
        n += 1
    for p in output_dir.rglob(".tmp-*"):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


def failure_reason(e: BaseException) -> str:
    """One line for the manifest saying why a series failed."""
    if isinstance(e, (SeriesRejectedError, FileNotFoundError, ValueError, RuntimeError)):
        text = str(e).strip().splitlines()
        line = text[-1] if isinstance(e, RuntimeError) and "Traceback" in str(e) else " ".join(text)
        return line[:500] or type(e).__name__
    return f"{type(e).__name__}: {e}"[:500]


def run_batch(opts: BatchOptions) -> dict:
    """Run a batch; returns the summary (also written to ``batch_summary.json``)."""
    t_start = time.perf_counter()
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    formats = tuple(f.strip().lower() for f in opts.formats)
    if not formats or any(f not in FORMATS for f in formats):
        raise ValueError(f"unknown output format(s) {[f for f in formats if f not in FORMATS]}; choose from {FORMATS}")
    with _exclusive(out):
        cleaned = _clean_partial_files(out)
        tmp_dir, staging = out / ".tmp", out / ".tmp" / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(out / "manifest.jsonl")
        pipeline = Bundle(opts.bundle_dir, opts.config_files, opts.overrides).pipeline(
            device=opts.device, checkpoint=opts.checkpoint, random_weights=opts.allow_random_weights,
            fuse=opts.fuse, amp=opts.amp, output_dir=staging, quiet=True)
        plan = plan_batch(opts.input_dir, out, manifest, pipeline.model_version, opts.rules, opts.all_matched,
                          opts.overwrite)
        counts = {"done": 0, "empty": 0, "skipped": 0, "failed": 0, "already_done": plan.already_done}
        for row in plan.skipped:
            counts["skipped"] += 1
            if not manifest.same_as_last(row):  # a rerun does not repeat an unchanged skip
                manifest.append({**row, "finished_at": _now()})
        worker = SeriesWorker(pipeline, out, tmp_dir, staging, formats, opts.max_gap_ratio,
                              software_version=f"ulite-monai {_package_version()}")
        loop = _run_items(plan.todo, worker, manifest, counts, opts)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        n_run, loop_s = len(plan.todo), loop["loop_s"]
        summary = {
            "model_version": pipeline.model_version,
            "device": str(pipeline.device),
            "input": str(opts.input_dir),
            "output": str(out),
            "counts": counts,
            "series_run": n_run,
            "discovery_s": round(plan.discovery_s, 3),
            "loop_s": round(loop_s, 3),
            "wall_s": round(time.perf_counter() - t_start, 3),
            "model_s": round(loop["model_s"], 3),
            "waiting_for_reader_s": round(loop["wait_s"], 3),
            "model_fraction_of_loop": round(loop["model_s"] / loop_s, 4) if loop_s > 0 else None,
            "series_per_minute": round(60.0 * n_run / loop_s, 2) if loop_s > 0 and n_run else None,
            "cleaned_partial_files": cleaned,
            "torn_manifest_lines": manifest.torn_lines,
        }
        save_json_atomically(summary, out / "batch_summary.json")
        return summary


def _run_items(todo: list, worker: SeriesWorker, manifest: Manifest, counts: dict, opts: BatchOptions) -> dict:
    """Segment ``todo`` in order (reading ahead), appending each row to the manifest; loop timings."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="series", desc="ulite-dicom", disable=not opts.progress, dynamic_ncols=True)
    fetch = Prefetcher(todo, worker.load, slots=2 if opts.prefetch else 1)
    fetch.start()
    model_s = wait_s = 0.0
    t_loop = time.perf_counter()
    try:
        it = iter(fetch)
        while True:
            tw = time.perf_counter()
            ld = next(it, None)
            item_wait = time.perf_counter() - tw
            wait_s += item_wait
            if ld is None:
                break
            t_item = time.perf_counter()
            try:
                row = worker.process(ld)
                row["timings_s"]["wait"] = round(item_wait, 4)
                row["timings_s"]["total"] = round(time.perf_counter() - t_item + ld.read_s + ld.preprocess_s, 4)
                model_s += row["timings_s"]["model"]
            except Exception as e:
                row = {**item_row(ld.item), "model_version": worker.pipeline.model_version, "status": "failed",
                       "reason": failure_reason(e)}
                bar.write(f"failed: {ld.item.key}: {row['reason']}")
            finally:
                worker.cleanup(ld)
                fetch.release()
            counts[row["status"]] += 1
            manifest.append({**row, "finished_at": _now()})
            bar.update(1)
            bar.set_postfix({k: v for k, v in counts.items() if v and k != "already_done"}, refresh=False)
    except BaseException:
        fetch.cancel()
        raise
    finally:
        bar.close()
    return {"loop_s": time.perf_counter() - t_loop, "model_s": model_s, "wait_s": wait_s}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _package_version() -> str:
    from ulite_monai import __version__

    return __version__
