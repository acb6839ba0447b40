# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Clinical batch inference: plan, then segment each series with the bundle, reading ahead, recording each.

Output layout under the output folder (names from sanitised UIDs, never from tag text)::

    <StudyInstanceUID>/<SeriesInstanceUID>.seg.dcm     DICOM SEG (not written for an empty prediction)
    <StudyInstanceUID>/<SeriesInstanceUID>.nii.gz      label volume in the series geometry
    <StudyInstanceUID>/<SeriesInstanceUID>.rtstruct.dcm  RT Structure Set (``--formats ...,rtstruct``)
    <StudyInstanceUID>/<SeriesInstanceUID>.sr.dcm      SR volume report, TID 1500 (``--formats ...,sr``)
    <StudyInstanceUID>/<SeriesInstanceUID>.qc.png      QC preview (three planes, outlines)
    volumes/<relative path of the input file>.nii.gz   labels for NIfTI/NRRD/MHA inputs (and .qc.png)
    manifest.jsonl                                     one row per series/file and run (last row wins)
    batch_summary.json                                 counts and timings of the last run

The manifest row is appended after the outputs are renamed into place. A rerun skips series already
``done``/``empty`` with the same model version (bundle name, version and weights hash) unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ulite_monai.batch.commit import now
from ulite_monai.batch.manifest import Manifest
from ulite_monai.batch.plan import failure_reason, plan_batch
from ulite_monai.batch.prefetch import Prefetcher
from ulite_monai.batch.qc import ReviewRules
from ulite_monai.batch.remote import Downloader, Pusher, plan_remote
from ulite_monai.batch.worker import DEFAULT_FORMATS, FORMATS, SeriesWorker
from ulite_monai.bundle import Bundle
from ulite_monai.io.dicom_series import OUTPUT_MARKER, POSITION_TOLERANCE
from ulite_monai.io.pacs import DicomWebPacs, PacsAddress
from ulite_monai.utils import save_json_atomically

__all__ = ["BatchOptions", "run_batch", "failure_reason", "check_output_folder", "OutputFolderError"]


@dataclass
class BatchOptions:
    """What ``ulite-dicom`` was asked to do (see ``ulite-dicom --help``). ``fuse``/``amp`` ``None``: the
    bundle config's ``use_fused``/``amp``; ``config_files``: override files merged onto inference.json.
    ``source`` (a DICOMweb address) replaces ``input_dir``; ``push`` lists destinations for the DICOM outputs."""

    input_dir: Path | None
    output_dir: Path
    bundle_dir: Path | None = None
    config_files: Sequence[Path] | None = None
    rules: dict | None = None  # parsed selection rules; None = every image series
    all_matched: bool | None = None
    device: str = "auto"
    checkpoint: Path | None = None
    allow_random_weights: bool = False
    overwrite: bool = False
    formats: Sequence[str] = DEFAULT_FORMATS
    progress: bool = True
    prefetch: bool = True
    fuse: bool | None = None
    amp: bool | None = None
    max_gap_ratio: float = 3.0
    overrides: dict = field(default_factory=dict)
    position_tolerance: float = POSITION_TOLERANCE
    seg_type: str = "binary"
    review: ReviewRules = field(default_factory=ReviewRules)
    source: PacsAddress | None = None
    study_filters: dict = field(default_factory=dict)
    series_filters: dict = field(default_factory=dict)
    study_uids: list[str] = field(default_factory=list)
    push: Sequence[PacsAddress] = ()
    ca_bundle: str | None = None
    netrc_file: str | None = None
    attempts: int = 3
    retry_delay_s: float = 1.0
    shard: Any = None  # a batch.shards.Shard: run only that shard's keys (--num-shards/--shard-id)
    ray: Any = None  # a batch.ray_runner.RayOptions: segment on a Ray actor pool (--ray)


@contextlib.contextmanager
def _exclusive(output_dir: Path):
    import fcntl

    with open(output_dir / OUTPUT_MARKER, "w") as f:
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


def check_output_folder(out: Path) -> None:
    """Make sure ``out`` is a folder this process can write; :class:`OutputFolderError` says why not."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"output {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".tmp-probe-"):
            pass
    except OSError as e:
        raise OutputFolderError(f"output folder {out} cannot be written ({e.strerror or e})") from e


class OutputFolderError(OSError):
    """The output folder cannot be created or written."""


def run_batch(opts: BatchOptions) -> dict:
    """Run a batch; returns the summary (also written to ``batch_summary.json``)."""
    t_start = time.perf_counter()
    out = Path(opts.output_dir)
    check_output_folder(out)
    formats = tuple(f.strip().lower() for f in opts.formats)
    if not formats or any(f not in FORMATS for f in formats):
        raise ValueError(f"unknown output format(s) {[f for f in formats if f not in FORMATS]}; choose from {FORMATS}")
    if "sr" in formats and "seg" not in formats:
        raise ValueError("the SR volume report references the SEG: --formats sr needs seg too")
    shard = opts.shard
    started = time.time()
    with shard.hold(out) if shard is not None else _exclusive(out):
        if shard is None:
            from ulite_monai.batch.shards import absorb

            absorb(out)  # shard manifests merged, commits a killed shard/Ray run left half done finished
            cleaned = _clean_partial_files(out)
            tmp_dir, manifest = out / ".tmp", Manifest(out / "manifest.jsonl")
        else:  # a shard: its own manifest and temporaries, results committed through attempt folders
            tmp_dir, manifest = shard.scope(out), shard.manifest(out)
            cleaned = shard.clean(out, manifest)
        staging = tmp_dir / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        pipeline = Bundle(opts.bundle_dir, opts.config_files, opts.overrides).pipeline(
            device=opts.device if opts.ray is None else "cpu",  # with Ray the driver only plans: no GPU here
            checkpoint=opts.checkpoint, random_weights=opts.allow_random_weights, fuse=opts.fuse, amp=opts.amp,
            output_dir=staging, quiet=True)
        fetch = None
        if opts.source is not None:
            pacs = DicomWebPacs(opts.source, opts.ca_bundle, opts.netrc_file)
            plan = plan_remote(pacs, opts.study_filters, opts.series_filters, opts.study_uids, out, manifest,
                               pipeline.model_version, opts.rules, opts.all_matched, opts.overwrite)
            fetch = Downloader(pacs, tmp_dir, opts.attempts, opts.retry_delay_s)
        else:
            plan = plan_batch(opts.input_dir, out, manifest, pipeline.model_version, opts.rules, opts.all_matched,
                              opts.overwrite, images_2d=pipeline.info.spatial_dims == 2)
        if shard is not None:
            plan = shard.select(plan, manifest, pipeline.model_version, out)
        pusher = Pusher(opts.push, out, opts.ca_bundle, opts.netrc_file, opts.attempts, opts.retry_delay_s) \
            if opts.push else None
        counts = {"done": 0, "empty": 0, "skipped": 0, "failed": 0, "already_done": plan.already_done,
                  "needs_review": 0, "push_failed": 0, "repushed": 0}
        for row in plan.skipped:
            counts["skipped"] += 1
            if not manifest.same_as_last(row):  # a rerun does not repeat an unchanged skip
                manifest.append({**row, "finished_at": now()})
        if pusher is not None:  # finished earlier, but an object did not reach a destination: push it now
            for key, row in list(manifest.rows.items()):
                if pusher.pending(row) and key not in {it.key for it in plan.todo} and (shard is None or
                                                                                      shard.owns(key)):
                    row = pusher.push(row)
                    counts["repushed"] += 1
                    counts["push_failed"] += row["push_status"] != "ok"
                    manifest.append({**row, "finished_at": now()})
        torn_lines = manifest.torn_lines
        if opts.ray is not None:  # the driver plans and commits; a Ray actor pool segments (batch/ray_runner.py)
            from ulite_monai.batch.ray_runner import run_items_on_ray

            loop = run_items_on_ray(plan.todo, pipeline, manifest, counts, opts, pusher, out, tmp_dir)
        else:
            worker = SeriesWorker(pipeline, out, tmp_dir, staging, formats, opts.max_gap_ratio,
                                  software_version=f"ulite-monai {_package_version()}",
                                  position_tolerance=opts.position_tolerance, seg_type=opts.seg_type,
                                  review=opts.review, fetch=fetch)
            if shard is not None:
                worker, manifest = shard.committing(worker, manifest, out)
            loop = _run_items(plan.todo, worker, manifest, counts, opts, pusher)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        n_run, loop_s = len(plan.todo), loop["loop_s"]
        summary = {
            "model_version": pipeline.model_version,
            "device": loop.get("device") or str(pipeline.device),
            "input": opts.source.text if opts.source is not None else str(opts.input_dir),
            "output": str(out),
            "counts": counts,
            "series_run": n_run,
            "discovery_s": round(plan.discovery_s, 3),
            "loop_s": round(loop_s, 3),
            "wall_s": round(time.perf_counter() - t_start, 3),
            "model_s": round(loop["model_s"], 3),
            "waiting_for_reader_s": round(loop["wait_s"], 3),
            "push_s": round(loop["push_s"], 3),
            "model_fraction_of_loop": round(loop["model_s"] / loop_s, 4) if loop_s > 0 else None,
            "series_per_minute": round(60.0 * n_run / loop_s, 2) if loop_s > 0 and n_run else None,
            "cleaned_partial_files": cleaned,
            "torn_manifest_lines": torn_lines,
        }
        if "engine" in loop:
            summary["engine"] = loop["engine"]
        if shard is not None:
            summary.update(shard.describe(started))
        save_json_atomically(summary, shard.summary_path(out) if shard is not None else out / "batch_summary.json")
        return summary


def _run_items(todo: list, worker: SeriesWorker, manifest: Manifest, counts: dict, opts: BatchOptions,
               pusher: Pusher | None = None) -> dict:
    """Segment ``todo`` in order (reading ahead), appending each row to the manifest; loop timings."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="series", desc="ulite-dicom", disable=not opts.progress, dynamic_ncols=True)
    fetch = Prefetcher(todo, worker.load, slots=2 if opts.prefetch else 1)
    fetch.start()
    model_s = wait_s = push_s = 0.0
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
            try:
                row = worker.run(ld)
            finally:
                fetch.release()
            if row["status"] == "failed":
                bar.write(f"failed: {ld.item.key}: {row['reason']}")
            else:
                row["timings_s"]["wait"] = round(item_wait, 4)
                model_s += row["timings_s"]["model"]
            if pusher is not None and row["status"] == "done":
                row = pusher.push(row)
                push_s += row["push_s"]
                counts["push_failed"] += row["push_status"] != "ok"
            counts[row["status"]] += 1
            counts["needs_review"] += bool(row.get("needs_review"))
            manifest.append({**row, "finished_at": now()})
            bar.update(1)
            bar.set_postfix({k: v for k, v in counts.items() if v and k != "already_done"}, refresh=False)
    except BaseException:
        fetch.cancel()
        raise
    finally:
        bar.close()
    return {"loop_s": time.perf_counter() - t_loop, "model_s": model_s, "wait_s": wait_s, "push_s": push_s}



def _package_version() -> str:
    from ulite_monai import __version__

    return __version__
