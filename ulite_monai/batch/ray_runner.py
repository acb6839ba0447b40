# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""``ulite-dicom IN OUT --ray [ADDRESS]``: the batch on a Ray cluster, each worker holding the model once.

The driver (the ``ulite-dicom`` process) does everything a plain run does: it takes the output folder's lock,
discovers, selects and plans, records skipped series, and it is the only process that writes the manifest.
Only the per-series work moves out: a pool of Ray actors (``--workers``, each with ``--cpus-per-worker`` CPUs
and ``--gpus-per-worker`` GPUs) each load the bundle's :class:`~ulite_monai.bundle.InferencePipeline` once and
run a :class:`~ulite_monai.batch.worker.SeriesWorker` on the series the driver sends them: read and preprocess
the next series on one thread while the current one infers and writes on another (two series in flight per
worker, as the plain run's read-ahead), with workers overlapping each other.

Exactly once: a worker writes a series' outputs into a fresh attempt folder under ``<out>/.tmp/ray/`` and
returns the manifest row; the driver alone makes it final (journal, rename into place, manifest row: see
:mod:`ulite_monai.batch.commit`). A worker process killed mid-series, or a node lost, fails the series' task:
its attempt folder is dropped, the series goes back to the queue (to fail with the reason after
``max_attempts`` deaths, e.g. a series that runs a worker out of memory each time), and a replacement worker is
started. A driver killed mid-run kills its workers (Ray ends actors whose owner dies); the rerun finishes any
half-made commit, deletes the attempt folders and resumes like a plain rerun.

Every node must see the input and output folders at the same paths (a shared file system) and have the same
``ulite-monai``, bundle and checkpoint installed; a worker whose model version differs from the driver's refuses
to start. Without an address a private Ray instance is started for the run on this machine, listening on the
loopback interface only, and stopped at the end.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ulite_monai.batch.commit import Committer
from ulite_monai.batch.plan import WorkItem, failed_row, failure_reason

__all__ = ["RayOptions", "run_items_on_ray", "import_ray", "SeriesActor"]

logger = logging.getLogger(__name__)


@dataclass
class RayOptions:
    """How the batch uses Ray (``--ray``, ``--workers``, ``--cpus-per-worker``, ``--gpus-per-worker``).

    Attributes:
        address: a running cluster (``HOST:PORT``, ``auto``, ``ray://HOST:10001``); ``None``/``"local"``: start a
            private single-machine instance for this run (loopback only).
        workers: actors, each holding the model once.
        cpus_per_worker: Ray CPUs each actor reserves (also its torch threads unless ``threads``).
        gpus_per_worker: Ray GPUs each actor reserves (fractions share a GPU); > 0 runs the model on CUDA.
        threads: torch CPU threads per actor (default: ``cpus_per_worker``, at least 1).
        in_flight: series sent to one actor at a time (2: one reads while the other infers; 1: no read-ahead).
        max_attempts: a series whose worker dies this many times is recorded as failed.
        max_replacements: workers started to replace dead ones in one run (default ``2 * workers``).
        start_timeout_s: give up when no worker is ready this long while series wait (no resources for it?).
        verbose: pass the workers' log lines on to the driver's stderr.
    """

    address: str | None = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads: int | None = None
    in_flight: int = 2
    max_attempts: int = 3
    max_replacements: int | None = None
    start_timeout_s: float = 600.0
    verbose: bool = False

    @property
    def local(self) -> bool:
        return self.address in (None, "", "local")


def import_ray(local: bool = True):
    """Import Ray (the ``ray`` extra). For a private instance Ray is told to use the loopback address, so that
    nothing it starts listens on a network interface (set before Ray's first import).

    Raises:
        RuntimeError: Ray is not installed (with the install command).
    """
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's switch for loopback-only instances
    try:
        import ray
    except ImportError as e:
        raise RuntimeError(f"--ray needs Ray: pip install 'ulite-monai[ray]' ({e})") from None
    return ray


class SeriesActor:
    """One Ray worker: the bundle's pipeline loaded once, a SeriesWorker, one series reading while one infers.

    Args:
        spec: what to load and how to write (built by :func:`run_items_on_ray` from the batch options).
    """

    def __init__(self, spec: dict) -> None:
        import uuid
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Current stack size", category=RuntimeWarning)  # holoscan

        import torch

        from ulite_monai.batch.worker import SeriesWorker
        from ulite_monai.bundle import Bundle

        logging.getLogger("monai.data.image_writer").setLevel(logging.WARNING)
        torch.set_num_threads(max(1, int(spec["threads"])))
        self.out = Path(spec["output_dir"])
        scope = Path(spec["scope"]) / f"worker-{uuid.uuid4().hex[:12]}"
        staging = scope / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        pipeline = Bundle(spec["bundle_dir"], spec["config_files"], spec["overrides"]).pipeline(
            device=spec["device"], checkpoint=spec["checkpoint"], random_weights=spec["random_weights"],
            fuse=spec["fuse"], amp=spec["amp"], output_dir=staging, quiet=True)
        if pipeline.model_version != spec["model_version"]:
            raise RuntimeError(
                f"this worker loaded {pipeline.model_version!r} but the driver planned with {spec['model_version']!r}: "
                "install the same bundle and checkpoint at the same path on every node")
        fetch = None
        if spec.get("source") is not None:
            from ulite_monai.batch.remote import Downloader
            from ulite_monai.io.pacs import DicomWebPacs

            pacs = DicomWebPacs(spec["source"], spec["ca_bundle"], spec["netrc_file"])
            fetch = Downloader(pacs, scope, spec["attempts"], spec["retry_delay_s"])
        self.worker = SeriesWorker(pipeline, self.out, scope, staging, spec["formats"], spec["max_gap_ratio"],
                                   software_version=spec["software_version"],
                                   position_tolerance=spec["position_tolerance"], seg_type=spec["seg_type"],
                                   review=spec["review"], fetch=fetch)
        self._read_lock, self._model_lock = threading.Lock(), threading.Lock()
        self._idle_since = time.perf_counter()

    def ready(self) -> dict:
        """Who and where this worker is (the driver waits for this before sending series)."""
        import ray

        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "device": str(self.worker.pipeline.device),
                "host": os.uname().nodename}

    def segment(self, item: WorkItem, attempt_dir: str) -> dict:
        """Read, infer and write one series into ``attempt_dir``; its manifest row (``failed`` with the reason
        when it cannot be segmented). The model runs for one series at a time; the next one reads meanwhile."""
        with self._read_lock:
            ld = self.worker.load(item)
        with self._model_lock:
            wait = max(0.0, time.perf_counter() - self._idle_since)
            try:
                self.worker.out = Path(attempt_dir)
                # a failure leaves the real outputs alone: the driver discards the attempt folder
                row = self.worker.run(ld, remove_failed=False)
            finally:
                self.worker.out = self.out
                self._idle_since = time.perf_counter()
        if row["status"] != "failed":
            row["timings_s"]["wait"] = round(wait, 4)
        return {"row": row, "pid": os.getpid()}


class _Slot:
    def __init__(self, handle, ready_ref, started: float) -> None:
        self.handle, self.ready_ref, self.started = handle, ready_ref, started
        self.info: dict | None = None
        self.in_flight = 0
        self.alive = True


class _Workers:
    """The actor pool: starting, replacing (up to a budget) and stopping workers, and the ``engine`` counters."""

    def __init__(self, ray, actor_cls, spec: dict, ro: RayOptions, engine: dict) -> None:
        self.ray, self.actor_cls, self.spec, self.engine = ray, actor_cls, spec, engine
        self.slots: list[_Slot] = []
        self.replacements_left = ro.max_replacements if ro.max_replacements is not None else 2 * ro.workers

    def spawn(self) -> None:
        handle = self.actor_cls.remote(self.spec)
        self.slots.append(_Slot(handle, handle.ready.remote(), time.perf_counter()))
        self.engine["workers_started"] += 1

    def replace(self) -> bool:
        """Start a replacement worker if the budget allows; whether one was started."""
        if self.replacements_left <= 0:
            return False
        self.replacements_left -= 1
        self.spawn()
        return True

    def drop(self, slot: _Slot) -> None:
        """A worker is gone (or unusable): kill it and start a replacement if the budget allows."""
        if not slot.alive:
            return
        slot.alive = False
        self.engine["workers_lost"] += 1
        with contextlib.suppress(Exception):
            self.ray.kill(slot.handle, no_restart=True)
        self.replace()

    def starting(self) -> dict:
        """``ready`` reference -> slot, for the live workers still loading the bundle."""
        return {s.ready_ref: s for s in self.slots if s.alive and s.info is None}

    def any_ready(self) -> bool:
        return any(s.alive and s.info is not None for s in self.slots)

    def mark_ready(self, slot: _Slot, info: dict, t_connect: float) -> None:
        slot.info = info
        self.engine["worker_devices"].append(info["device"])
        if info["node_id"] not in self.engine["worker_nodes"]:
            self.engine["worker_nodes"].append(info["node_id"])
        if self.engine["first_worker_ready_s"] is None:
            self.engine["first_worker_ready_s"] = round(time.perf_counter() - t_connect, 3)

    def kill_all(self) -> None:
        for slot in self.slots:
            with contextlib.suppress(Exception):
                self.ray.kill(slot.handle, no_restart=True)


def _actor_spec(opts, pipeline, out: Path, scope: Path, ro: RayOptions) -> dict:
    from ulite_monai.batch.runner import _package_version

    device = opts.device
    if ro.gpus_per_worker > 0 and not str(device).startswith("cuda"):
        device = "cuda"
    elif ro.gpus_per_worker <= 0 and str(device) in ("", "auto"):
        device = "cpu"  # a worker without a GPU reservation never takes one
    return {
        "bundle_dir": str(pipeline.bundle.root), "config_files": [str(f) for f in pipeline.bundle.files],
        "overrides": dict(opts.overrides or {}), "device": device,
        "checkpoint": str(opts.checkpoint) if opts.checkpoint else None, "random_weights": opts.allow_random_weights,
        "fuse": opts.fuse, "amp": opts.amp, "output_dir": str(out), "scope": str(scope),
        "formats": tuple(f.strip().lower() for f in opts.formats), "max_gap_ratio": opts.max_gap_ratio,
        "position_tolerance": opts.position_tolerance, "seg_type": opts.seg_type, "review": opts.review,
        "software_version": f"ulite-monai {_package_version()}", "model_version": pipeline.model_version,
        "threads": ro.threads or max(1, int(ro.cpus_per_worker)), "source": opts.source, "ca_bundle": opts.ca_bundle,
        "netrc_file": opts.netrc_file, "attempts": opts.attempts, "retry_delay_s": opts.retry_delay_s,
    }


@contextlib.contextmanager
def _connected(ro: RayOptions):
    """Connect to the cluster (or start a private loopback instance); disconnect/stop at the end."""
    ray = import_ray(ro.local)
    if ray.is_initialized():  # the caller connected (an application embedding the batch)
        yield ray, "existing"
        return
    t = time.perf_counter()
    kwargs: dict[str, Any] = {"log_to_driver": ro.verbose, "configure_logging": True,
                              "logging_level": logging.INFO if ro.verbose else logging.WARNING}
    if ro.local:
        need = max(1, int(round(ro.workers * ro.cpus_per_worker)))
        kwargs.update(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False,
                      object_store_memory=256 * 1024 * 1024)
        address = "local"
        ray.init(**kwargs)
    else:
        address = ro.address
        ray.init(address=ro.address, **kwargs)
    logger.info("connected to Ray (%s) in %.1f s", address, time.perf_counter() - t)
    try:
        yield ray, address
    finally:
        ray.shutdown()


def _commit(committer: Committer, item: WorkItem, row: dict, attempt: Path, pusher, counts: dict,
            model_version: str, bar) -> dict | None:
    """Commit one finished series on the driver (stage its attempt folder, push, record the manifest row); the
    committed row, or None for a late duplicate (the first result stands)."""
    from ulite_monai.batch.commit import DuplicateResult

    if item.key in committer.committed:
        committer.discard(attempt)
        return None
    try:
        if row["status"] in ("done", "empty"):
            row = committer.stage(item, row, attempt)
        else:
            committer.discard(attempt)
    except DuplicateResult:
        return None
    except OSError as e:
        committer.discard(attempt)
        row = failed_row(item, model_version, failure_reason(e))
    if row["status"] == "failed":
        bar.write(f"failed: {item.key}: {row['reason']}")
    if pusher is not None and row["status"] == "done":
        row = pusher.push(row)
        counts["push_failed"] += row["push_status"] != "ok"
    if row["status"] == "failed":
        committer.fail(item, row)
    else:
        committer.record(row)
    return row


def run_items_on_ray(todo: list[WorkItem], pipeline, manifest, counts: dict, opts, pusher, out: Path,
                     tmp_dir: Path) -> dict:
    """Segment ``todo`` on a Ray actor pool, committing each result on the driver; the loop's timings and an
    ``engine`` description (see the module docstring). Called by :func:`~ulite_monai.batch.runner.run_batch`."""
    from tqdm.auto import tqdm

    ro: RayOptions = opts.ray
    t_connect = time.perf_counter()
    with _connected(ro) as (ray, address):
        connect_s = time.perf_counter() - t_connect
        from ray.exceptions import RayError, RayTaskError

        scope = tmp_dir / "ray"
        committer = Committer(out, scope, manifest)
        actor_cls = ray.remote(num_cpus=ro.cpus_per_worker, num_gpus=ro.gpus_per_worker, max_restarts=0,
                               max_concurrency=2)(SeriesActor)
        engine = {"name": "ray", "address": address, "workers": ro.workers, "cpus_per_worker": ro.cpus_per_worker,
                  "gpus_per_worker": ro.gpus_per_worker, "connect_s": round(connect_s, 3), "workers_started": 0,
                  "workers_lost": 0, "series_retried": 0, "first_worker_ready_s": None, "worker_devices": [],
                  "worker_nodes": [], "driver_commit_s": 0.0}
        workers = _Workers(ray, actor_cls, _actor_spec(opts, pipeline, out, scope, ro), ro, engine)
        for _ in range(max(1, ro.workers)):
            workers.spawn()
        bar = tqdm(total=len(todo), unit="series", desc="ulite-dicom (ray)", disable=not opts.progress,
                   dynamic_ncols=True)
        pending = collections.deque(todo)
        deaths: collections.Counter = collections.Counter()
        in_flight: dict = {}
        model_s = wait_s = push_s = 0.0
        t_loop: float | None = None  # the first series sent
        t_idle = time.perf_counter()  # since when no worker has been ready
        try:
            while pending or in_flight:
                for slot in workers.slots:  # keep every ready worker busy
                    while slot.alive and slot.info is not None and slot.in_flight < max(1, ro.in_flight) and pending:
                        item = pending.popleft()
                        t_loop = t_loop or time.perf_counter()
                        attempt = committer.new_attempt(item.key)
                        in_flight[slot.handle.segment.remote(item, str(attempt))] = (slot, item, attempt)
                        slot.in_flight += 1
                starting = workers.starting()
                if not in_flight and not starting:
                    if workers.replace():
                        continue
                    raise RuntimeError(f"every Ray worker died; {len(pending)} series not segmented (rerun to resume)")
                done, _ = ray.wait([*in_flight, *starting], num_returns=1, timeout=5.0)
                if not done:
                    if workers.any_ready():
                        t_idle = time.perf_counter()
                    elif time.perf_counter() - t_idle > ro.start_timeout_s:
                        raise RuntimeError(
                            f"no Ray worker could start within {ro.start_timeout_s:.0f} s; does the cluster have "
                            f"{ro.cpus_per_worker} CPU(s) and {ro.gpus_per_worker} GPU(s) free per worker?")
                    continue
                ref = done[0]
                if ref in starting:  # a worker finished loading the bundle (or failed to)
                    try:
                        workers.mark_ready(starting[ref], ray.get(ref), t_connect)
                    except RayError as e:
                        if getattr(e, "actor_init_failed", False):
                            raise RuntimeError(f"a Ray worker could not load the bundle: {_first_line(e)}") from None
                        workers.drop(starting[ref])
                        continue
                    t_idle = time.perf_counter()
                    continue
                slot, item, attempt = in_flight.pop(ref)
                slot.in_flight -= 1
                try:
                    row = ray.get(ref)["row"]
                except RayTaskError as e:  # the task itself raised (SeriesActor.segment catches series errors)
                    committer.discard(attempt)
                    cause = e.cause if getattr(e, "cause", None) else e
                    row = failed_row(item, pipeline.model_version, failure_reason(cause))
                except RayError as e:  # the worker process or its node is gone: the series goes back to the queue
                    committer.discard(attempt)
                    workers.drop(slot)
                    deaths[item.key] += 1
                    if deaths[item.key] < ro.max_attempts:
                        engine["series_retried"] += 1
                        pending.appendleft(item)
                        bar.write(f"worker lost while segmenting {item.key} ({type(e).__name__}); retrying it")
                        continue
                    row = failed_row(item, pipeline.model_version,
                                     f"the worker process ended {deaths[item.key]} times while segmenting this "
                                     f"series (out of memory?); last: {type(e).__name__}")
                t_commit = time.perf_counter()
                row = _commit(committer, item, row, attempt, pusher, counts, pipeline.model_version, bar)
                if row is None:
                    continue
                engine["driver_commit_s"] += time.perf_counter() - t_commit  # (includes a push, if any)
                push_s += row.get("push_s") or 0.0  # set by the push in _commit, if any
                timings = row.get("timings_s") or {}
                model_s += timings.get("model", 0.0)
                wait_s += timings.get("wait", 0.0)
                counts[row["status"]] += 1
                counts["needs_review"] += bool(row.get("needs_review"))
                bar.update(1)
                bar.set_postfix({k: v for k, v in counts.items() if v and k != "already_done"}, refresh=False)
        finally:
            bar.close()
            workers.kill_all()
        t_end = time.perf_counter()
        loop_s = t_end - (t_loop or t_end)
        engine["connect_to_first_series_s"] = round((t_loop or t_end) - t_connect, 3)
        engine["worker_nodes"] = len(engine["worker_nodes"])
        engine["driver_commit_s"] = round(engine["driver_commit_s"], 3)
        devices = sorted(set(engine["worker_devices"]))
        engine["worker_devices"] = devices
        return {"loop_s": loop_s, "model_s": model_s, "wait_s": wait_s, "push_s": push_s, "engine": engine,
                "device": ", ".join(devices)}


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln and not ln.startswith(("File ", "Traceback"))]
    return (errs[-1] if errs else lines[0] if lines else type(e).__name__)[:500]
