# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Exactly-once results for the scale-out runners (Ray, shards): attempt folders and one committer.

A worker (a Ray actor, or a shard's own loop) writes a series' outputs into a fresh *attempt folder*,
``<out>/.tmp/<scope>/attempts/<id>/``, laid out like the output tree. Nothing in an attempt folder has a final
name. The committer (the Ray driver, or the shard process; one per manifest) then makes the result final:

1. **stage**: writes a journal ``<out>/.tmp/<scope>/commits/<key digest>.json`` (temp + rename + fsync) with the
   row, the renames attempt -> final name and the key's older outputs to delete; then renames each file into
   place (``os.replace``: atomic per file, same file system) and deletes those older outputs;
2. (the caller may push the final DICOM objects to a PACS here);
3. **record**: appends the row to the manifest (fsync): the commit point; then deletes the journal and the
   attempt folder.

A process killed anywhere leaves either no journal (the row is in the manifest, or the result never started to
become final and the rerun redoes the series) or a journal that the next start rolls forward
(:func:`recover`): the renames still to do are done, and the row is appended unless the manifest already holds
it. A killed worker's attempt folder is never renamed into place; the next start deletes it. A key is
committed at most once per committer: a second result for it (a worker presumed dead that finished after
all) is dropped with its attempt folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterable

from ulite_monai.batch.manifest import Manifest
from ulite_monai.batch.plan import OUTPUT_SUFFIXES, WorkItem

__all__ = ["Committer", "DuplicateResult", "recover", "key_digest", "stale_outputs", "scope_dirs", "now"]

SCALE_OUT_TMP = ".tmp"  # scopes live under <out>/.tmp/<scope>/ (the plain run removes .tmp at its start)
_ROW_VOLATILE = ("finished_at", "push", "push_s", "push_status")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def key_digest(key: str) -> str:
    """A file-name-safe digest of a manifest key."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


def stale_outputs(item: WorkItem, keep: Iterable[str] = ()) -> set[str]:
    """Output paths of ``item`` (relative to the output folder) a new result replaces: its last row's outputs and
    every output name at its stem, less ``keep`` (the rule ``SeriesWorker.remove_outputs`` applies)."""
    keep_n = {os.path.normpath(k) for k in keep}
    cands = set(item.previous_outputs) | {item.out_stem + suf for suf in OUTPUT_SUFFIXES}
    return {c for c in cands if os.path.normpath(c) not in keep_n}


def _row_identity(row: dict) -> str:
    """A row without the fields that change between staging and recording (push results, wait/total timings)."""
    core = {k: v for k, v in row.items() if k not in _ROW_VOLATILE}
    if isinstance(core.get("timings_s"), dict):
        core["timings_s"] = {k: v for k, v in core["timings_s"].items() if k not in ("wait", "total")}
    return json.dumps(core, sort_keys=True, default=str)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_journal(path: Path, journal: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}.json")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(journal, f, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _apply(out: Path, journal: dict) -> None:
    """Do the journal's renames and deletions (idempotent: a rename already done is skipped)."""
    for src_rel, dst_rel in journal["moves"]:
        src, dst = out / src_rel, out / dst_rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        elif not dst.is_file():
            raise FileNotFoundError(f"commit of {journal['key']}: neither {src_rel} nor {dst_rel} exists")
    for rel in journal["remove"]:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            (out / rel).unlink()
    for _, dst_rel in journal["moves"]:
        _fsync_dir((out / dst_rel).parent)


class DuplicateResult(RuntimeError):
    """A second result for a key this committer has already made final."""


class Committer:
    """Makes worker results final, once per key (see the module docstring).

    Args:
        output_dir: the batch output folder.
        scope_dir: this committer's folder under ``<out>/.tmp`` (attempts and journals live there).
        manifest: where rows are recorded (the output folder's manifest, or a shard's).
    """

    def __init__(self, output_dir: str | os.PathLike, scope_dir: str | os.PathLike, manifest: Manifest) -> None:
        self.out = Path(output_dir)
        self.scope = Path(scope_dir)
        self.manifest = manifest
        self.journals = self.scope / "commits"
        self.attempts = self.scope / "attempts"
        self.committed: set[str] = set()

    # -- attempts ----------------------------------------------------------------------------------------------
    def new_attempt(self, key: str) -> Path:
        """A fresh, empty attempt folder for one try at ``key`` (created)."""
        path = self.attempts / f"{key_digest(key)}-{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        return path

    @staticmethod
    def discard(attempt: str | os.PathLike | None) -> None:
        """Delete an attempt folder that will not be committed (its worker failed or died)."""
        if attempt:
            shutil.rmtree(attempt, ignore_errors=True)

    # -- commit --------------------------------------------------------------------------------------------------
    def stage(self, item: WorkItem, row: dict, attempt: str | os.PathLike) -> dict:
        """Journal, then rename ``attempt``'s files into place and delete the key's older outputs.
        Returns the row (with ``finished_at``); :meth:`record` completes the commit.

        Raises:
            DuplicateResult: the key was committed before by this committer (the attempt is discarded).
            FileNotFoundError: an output the row names is missing from the attempt.
        """
        key = row["key"]
        if key in self.committed:
            self.discard(attempt)
            raise DuplicateResult(f"{key} was already committed in this run")
        attempt = Path(attempt)
        outputs = {k: v for k, v in (row.get("outputs") or {}).items() if v}
        moves = []
        for rel in outputs.values():
            if not (attempt / rel).is_file():
                raise FileNotFoundError(f"{key}: the worker's result lacks {rel}")
            moves.append([os.path.relpath(attempt / rel, self.out), rel])
        row = {**row, "finished_at": now()}
        journal = {"key": key, "row": row, "moves": moves, "remove": sorted(stale_outputs(item, outputs.values())),
                   "attempt": os.path.relpath(attempt, self.out)}
        _write_journal(self.journals / f"{key_digest(key)}.json", journal)
        _apply(self.out, journal)
        return row

    def record(self, row: dict) -> None:
        """Append the row (the commit point), then drop the journal and the attempt folder of its key."""
        key = row["key"]
        if key in self.committed:
            raise DuplicateResult(f"{key} was already committed in this run")
        self.manifest.append(row if "finished_at" in row else {**row, "finished_at": now()})
        self.committed.add(key)
        jpath = self.journals / f"{key_digest(key)}.json"
        if jpath.is_file():
            with contextlib.suppress(OSError, ValueError):
                self.discard(self.out / json.loads(jpath.read_text(encoding="utf-8"))["attempt"])
            jpath.unlink()

    def fail(self, item: WorkItem, row: dict) -> None:
        """Record a failed (or otherwise output-less) result: the key's older outputs go, then the row."""
        for rel in stale_outputs(item, ()):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                (self.out / rel).unlink()
        self.record(row)


def recover(output_dir: str | os.PathLike, scope_dir: str | os.PathLike, manifest: Manifest) -> int:
    """Roll forward the commits a killed committer left in ``scope_dir``; the number completed.

    Each journal's renames are done where still pending and its row is appended to ``manifest`` unless the
    manifest's last row of that key is that row already. Journals whose files are gone (their attempt folder was
    deleted) are dropped: those series are redone."""
    out, journals = Path(output_dir), Path(scope_dir) / "commits"
    done = 0
    if not journals.is_dir():
        return 0
    for jpath in sorted(journals.glob("*.json")):
        if jpath.name.startswith(".tmp-"):
            jpath.unlink()
            continue
        try:
            journal = json.loads(jpath.read_text(encoding="utf-8"))
            _apply(out, journal)
        except (OSError, ValueError, KeyError):
            jpath.unlink()  # torn or unusable journal: the row was never appended; the series is redone
            continue
        row = journal["row"]
        last = manifest.rows.get(row["key"])
        if last is None or _row_identity(last) != _row_identity(row):
            manifest.append(row)
        shutil.rmtree(out / journal["attempt"], ignore_errors=True)
        jpath.unlink()
        done += 1
    return done


def scope_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Every committer scope under ``<out>/.tmp`` (``ray``, ``shard-0001-of-0004``, ...)."""
    tmp = Path(output_dir) / SCALE_OUT_TMP
    return sorted(p for p in tmp.iterdir() if p.is_dir() and (p / "commits").is_dir()) if tmp.is_dir() else []
