# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Static shards for job arrays (SLURM ``--array``, Kubernetes Indexed Jobs), no Ray needed.

::

    ulite-dicom IN OUT --num-shards 16 --shard-id 3     # or K from SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX
    ulite-dicom merge OUT                               # once every shard has finished

**Split.** A manifest key (``dicom:<study>/<series>``, ``file:<path>``, ...) belongs to shard
``int(sha256(key)[:16], 16) mod N``: stable across machines, Python versions, file orders and reruns, and
independent of what else is in the input. Every shard discovers and plans the whole input (so output names,
collision suffixes and resume decisions are exactly those of a single run) and keeps only its own keys, skipped
rows included.

**One output tree, many shards.** A plain run holds an exclusive lock on ``<out>/.ulite-dicom.lock``; a shard
holds a *shared* lock on it plus an exclusive lock on ``<out>/shards/shard-K-of-N.lock``: shards of one layout
run together, a second copy of the same shard, a plain run or ``merge`` cannot start meanwhile. Each shard
appends to its own manifest ``<out>/shards/shard-K-of-N.jsonl`` (planning reads every manifest), writes its
temporaries only under ``<out>/.tmp/shard-K-of-N/`` and makes each result final through the commit protocol
of :mod:`ulite_monai.batch.commit` (attempt folder, journal, rename, row). Shards of different ``N`` may not
run at the same time (they would share keys); a shard refuses to start while one is running.

**Merge.** ``ulite-dicom merge OUT`` (exclusive lock: no shard may be running) appends the shard manifests'
rows to ``manifest.jsonl`` (idempotent: a row already there is not added twice), finishes commits a killed
shard left half done, deletes the shard manifests and writes ``batch_summary.json``: final counts over all
keys, each shard's figures, and the shards that never reported (a failed array task). A plain or Ray run on the
same output folder merges first by itself.

Locks are ``flock`` locks: local file systems and NFSv4 honour them across clients; on Lustre mount with
``-o flock``; where locks are not shared between nodes, do not start the same shard twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ulite_monai.batch.commit import Committer, recover, scope_dirs
from ulite_monai.batch.manifest import FINISHED, Manifest, read_rows
from ulite_monai.batch.plan import Plan
from ulite_monai.io.dicom_series import OUTPUT_MARKER
from ulite_monai.utils import save_json_atomically

__all__ = ["Shard", "shard_of", "shard_from_env", "CohortManifest", "absorb", "merge", "cohort_summary",
           "SHARDS_DIR", "ShardError"]

SHARDS_DIR = "shards"
_NAME = re.compile(r"^shard-(\d+)-of-(\d+)$")


class ShardError(RuntimeError):
    """A shard cannot start (bad index, another layout running, the same shard running)."""


def shard_of(key: str, num_shards: int) -> int:
    """The shard of a manifest key: ``int(sha256(key)[:16 hex], 16) mod num_shards``."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) % num_shards


def shard_from_env(num_shards: int, shard_id: int | None = None, env: dict | None = None) -> Shard:
    """The shard to run: ``shard_id`` or, when it is ``None``, the array index of the job scheduler
    (``SLURM_ARRAY_TASK_ID`` less ``SLURM_ARRAY_TASK_MIN``, Kubernetes ``JOB_COMPLETION_INDEX``).

    Raises:
        ShardError: no index given or found, or one outside ``0..num_shards-1``.
    """
    env = os.environ if env is None else env
    if num_shards is None or num_shards < 1:
        raise ShardError(f"--num-shards must be 1 or more (got {num_shards})")
    if shard_id is None:
        if env.get("SLURM_ARRAY_TASK_ID", "").strip():
            shard_id = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN") or 0)
        elif env.get("JOB_COMPLETION_INDEX", "").strip():
            shard_id = int(env["JOB_COMPLETION_INDEX"])
        else:
            raise ShardError("--num-shards needs --shard-id K (or SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX set by "
                             "the job array)")
    if not 0 <= shard_id < num_shards:
        raise ShardError(f"shard id {shard_id} is outside 0..{num_shards - 1} (--num-shards {num_shards})")
    return Shard(num_shards, shard_id)


def _shard_files(out: Path) -> list[Path]:
    folder = out / SHARDS_DIR
    return sorted(p for p in folder.glob("shard-*-of-*.jsonl") if _NAME.match(p.name[: -len(".jsonl")])) \
        if folder.is_dir() else []


class CohortManifest(Manifest):
    """A shard's manifest: appends go to the shard's own file; reading sees every row of the output folder
    (``manifest.jsonl``, then the shard manifests not merged yet, in ``finished_at`` order)."""

    def __init__(self, path: str | os.PathLike, main: str | os.PathLike) -> None:
        self.main = Path(main)
        super().__init__(path)

    def load(self) -> None:
        main = Manifest(self.main)
        self.rows = dict(main.rows)
        self.torn_lines = main.torn_lines
        extra: list[tuple[str, str, int, dict]] = []
        for f in _shard_files(self.main.parent):
            rows, torn = read_rows(f)
            self.torn_lines += torn
            extra += [(str(r.get("finished_at", "")), f.name, n, r) for n, r in enumerate(rows)]
        for *_, row in sorted(extra, key=lambda t: t[:3]):
            self.rows[row["key"]] = row


@dataclass(frozen=True)
class Shard:
    """Shard ``shard_id`` of ``num_shards`` (see the module docstring)."""

    num_shards: int
    shard_id: int

    @property
    def name(self) -> str:
        return f"shard-{self.shard_id:04d}-of-{self.num_shards:04d}"

    def owns(self, key: str) -> bool:
        return shard_of(key, self.num_shards) == self.shard_id

    def scope(self, out: Path) -> Path:
        return Path(out) / ".tmp" / self.name

    def manifest_path(self, out: Path) -> Path:
        return Path(out) / SHARDS_DIR / f"{self.name}.jsonl"

    def summary_path(self, out: Path) -> Path:
        return Path(out) / SHARDS_DIR / f"{self.name}.summary.json"

    def manifest(self, out: Path) -> CohortManifest:
        return CohortManifest(self.manifest_path(out), Path(out) / "manifest.jsonl")

    @contextlib.contextmanager
    def hold(self, out: Path):
        """Shared lock on the output folder, exclusive lock on this shard; refuses while another layout runs."""
        out = Path(out)
        (out / SHARDS_DIR).mkdir(exist_ok=True)
        with open(out / OUTPUT_MARKER, "a") as main, open(out / SHARDS_DIR / f"{self.name}.lock", "a") as own:
            try:
                fcntl.flock(main, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ShardError(f"a plain ulite-dicom run or a merge is using {out}; start the shards after it") \
                    from None
            try:
                fcntl.flock(own, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ShardError(f"{self.name} is already running on {out}") from None
            for other in sorted((out / SHARDS_DIR).glob("shard-*-of-*.lock")):
                m = _NAME.match(other.name[: -len(".lock")])
                if not m or int(m.group(2)) == self.num_shards:
                    continue
                with open(other, "a") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise ShardError(f"{other.stem} is running on {out}: shards of one run must share "
                                         f"--num-shards (this one has {self.num_shards})") from None
                    fcntl.flock(f, fcntl.LOCK_UN)
            yield

    def clean(self, out: Path, manifest: Manifest) -> int:
        """Finish this shard's interrupted commits, then remove its temporaries; the number of both."""
        n = recover(out, self.scope(out), manifest)
        if self.scope(out).exists():
            shutil.rmtree(self.scope(out), ignore_errors=True)
            n += 1
        return n

    def select(self, plan: Plan, manifest: Manifest, model_version: str, out: Path) -> Plan:
        """This shard's part of a whole-input plan (work items and skipped rows)."""
        todo = [it for it in plan.todo if self.owns(it.key)]
        skipped = [r for r in plan.skipped if self.owns(r["key"])]
        todo_keys = {it.key for it in plan.todo}
        already = sum(1 for k, r in manifest.rows.items()
                      if k not in todo_keys and self.owns(k) and r.get("status") in FINISHED
                      and Manifest.row_finished(r, model_version, Path(out)))
        return Plan(todo=todo, skipped=skipped, already_done=min(already, plan.already_done),
                    discovery_s=plan.discovery_s)

    def committing(self, worker, manifest: Manifest, out: Path):
        """``(worker, manifest)`` for the batch loop: results pass through an attempt folder and the committer."""
        committer = Committer(out, self.scope(out), manifest)
        return _CommittingWorker(worker, committer), _CommittingManifest(committer)

    def describe(self, started: float) -> dict:
        return {"shard": {"id": self.shard_id, "count": self.num_shards, "name": self.name},
                "started_at_epoch": round(started, 3), "ended_at_epoch": round(time.time(), 3)}


class _CommittingWorker:
    """A :class:`~ulite_monai.batch.worker.SeriesWorker` whose results are written into a fresh attempt folder
    each and made final by the committer (staged in :meth:`process`, recorded by the manifest's append)."""

    def __init__(self, worker, committer: Committer) -> None:
        self.worker, self.committer = worker, committer
        self.pipeline = worker.pipeline
        self._final = worker.out

    def load(self, item):
        return self.worker.load(item)

    def process(self, ld) -> dict:
        attempt = self.committer.new_attempt(ld.item.key)
        self.worker.out = attempt
        try:
            row = self.worker.process(ld)
        except BaseException:
            self.committer.discard(attempt)
            raise
        finally:
            self.worker.out = self._final
        return self.committer.stage(ld.item, row, attempt)

    def remove_outputs(self, item, keep=()) -> None:  # a failed series: its older outputs go (as in a plain run)
        from ulite_monai.batch.commit import stale_outputs

        for rel in stale_outputs(item, keep):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                (self.committer.out / rel).unlink()

    def cleanup(self, ld) -> None:
        self.worker.cleanup(ld)

    def run(self, ld, remove_failed: bool = True) -> dict:
        """:func:`~ulite_monai.batch.worker.run_series` through this wrapper's process, remove_outputs, cleanup."""
        from ulite_monai.batch.worker import run_series

        return run_series(self, ld, remove_failed)


class _CommittingManifest:
    def __init__(self, committer: Committer) -> None:
        self.committer = committer

    def append(self, row: dict) -> None:
        self.committer.record(row)


# ------------------------------------------------------------------------------------------------ merge, summary


def _identity(row: dict) -> str:
    return json.dumps(row, sort_keys=True, default=str)


def absorb(out: str | os.PathLike) -> dict:
    """Bring every scale-out state of ``out`` into ``manifest.jsonl``: the shard manifests' rows are appended (rows
    already there are not repeated), the shard manifests deleted, and commits a killed shard or Ray driver left
    half done are finished. Call it holding the output folder's exclusive lock (no shard running)."""
    out = Path(out)
    main_path = out / "manifest.jsonl"
    files = _shard_files(out)
    merged = 0
    if files:
        present: set[str] = set()
        if main_path.is_file():
            present = {_identity(r) for r in read_rows(main_path)[0]}
        extra = []
        for f in files:
            extra += [(str(r.get("finished_at", "")), f.name, n, r) for n, r in enumerate(read_rows(f)[0])]
        lines = []
        for *_, row in sorted(extra, key=lambda t: t[:3]):
            ident = _identity(row)
            if ident not in present:
                present.add(ident)
                lines.append(json.dumps(row, default=str))
        if lines:
            old = main_path.read_bytes() if main_path.is_file() else b""
            if old and not old.endswith(b"\n"):
                old += b"\n"
            tmp = main_path.with_name(".tmp-manifest.jsonl")
            with open(tmp, "wb") as f:
                f.write(old + ("\n".join(lines) + "\n").encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, main_path)
            merged = len(lines)
        for f in files:
            f.unlink()
    scopes = scope_dirs(out)
    manifest = Manifest(main_path) if scopes else None
    recovered = sum(recover(out, scope, manifest) for scope in scopes)
    return {"merged_rows": merged, "merged_manifests": len(files), "recovered_commits": recovered}


def cohort_summary(out: str | os.PathLike) -> dict:
    """Final counts over every key of ``out``'s manifest and what each shard reported."""
    out = Path(out)
    manifest = Manifest(out / "manifest.jsonl")
    counts = {s: 0 for s in ("done", "empty", "skipped", "failed")}
    counts.update(needs_review=0, push_failed=0)
    versions: dict[str, int] = {}
    for row in manifest.rows.values():
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        counts["needs_review"] += bool(row.get("needs_review"))
        counts["push_failed"] += row.get("push_status") == "failed"
        if row.get("model_version"):
            versions[row["model_version"]] = versions.get(row["model_version"], 0) + 1
    shards = []
    for p in sorted((out / SHARDS_DIR).glob("shard-*-of-*.summary.json")) if (out / SHARDS_DIR).is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            shards.append(json.loads(p.read_text(encoding="utf-8")))
    summary: dict[str, Any] = {"output": str(out), "keys": len(manifest.rows), "counts": counts,
                               "model_versions": versions, "torn_manifest_lines": manifest.torn_lines}
    if shards:
        n = max(s["shard"]["count"] for s in shards)
        latest = {s["shard"]["id"]: s for s in shards if s["shard"]["count"] == n}
        run = sum(s.get("series_run", 0) for s in latest.values())
        timed = [s for s in latest.values() if "ended_at_epoch" in s and "started_at_epoch" in s]
        ends = [s["ended_at_epoch"] for s in timed]
        # loops: from the first shard's first series to the last shard's end; wall: from the first shard's start
        span = max(ends) - min(s["ended_at_epoch"] - s.get("loop_s", 0) for s in timed) if timed else None
        wall = max(ends) - min(s["started_at_epoch"] for s in timed) if timed else None
        summary["shards"] = {
            "count": n,
            "reported": sorted(latest),
            "missing": [k for k in range(n) if k not in latest],
            "series_run": run,
            "span_s": round(span, 3) if span else None,
            "wall_span_s": round(wall, 3) if wall else None,
            "series_per_minute_combined": round(60.0 * run / span, 2) if span and run else None,
            "per_shard": [{"id": k, "series_run": s.get("series_run"), "series_per_minute": s.get("series_per_minute"),
                           "wall_s": s.get("wall_s"), "counts": s.get("counts")} for k, s in sorted(latest.items())],
        }
    return summary


def merge(out: str | os.PathLike, wait: bool = False) -> dict:
    """``ulite-dicom merge OUT``: absorb the shards' manifests and commits, write ``batch_summary.json``.

    Raises:
        ShardError: a shard (or another run) still holds the output folder and ``wait`` is off.
        FileNotFoundError: ``out`` is not an output folder.
    """
    out = Path(out)
    if not (out / OUTPUT_MARKER).is_file() and not (out / SHARDS_DIR).is_dir():
        raise FileNotFoundError(f"{out} is not a ulite-dicom output folder (no {OUTPUT_MARKER})")
    with open(out / OUTPUT_MARKER, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise ShardError(f"a shard or another run is still writing to {out}; merge when it has finished "
                             "(--wait waits for it)") from None
        absorbed = absorb(out)
        from ulite_monai.batch.runner import _clean_partial_files

        _clean_partial_files(out)
        summary = {"merged": absorbed, **cohort_summary(out)}
        save_json_atomically(summary, out / "batch_summary.json")
        return summary
