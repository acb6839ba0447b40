# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""PACS in and out for the batch: plan from a DICOMweb query, download series as they are read, push results.

Pull (``--from``): QIDO-RS finds the series; those already finished with this model version (manifest) are
skipped before anything is downloaded, so a rerun resumes across pulls. The others' headers come by WADO-RS
metadata and go through the same selection rules as local files; the selected series are downloaded by
WADO-RS one at a time, when the read-ahead reaches them, into the batch's temporary folder, read like a local
series and deleted after.

Push (``--push``): each DICOM output (SEG, RTSTRUCT, SR) goes to every destination (STOW-RS or C-STORE), with
retries; the manifest row lists each pushed object with its status. A rerun pushes again what failed before.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Sequence

import pydicom

from ulite_monai.batch.manifest import Manifest
from ulite_monai.batch.plan import Plan, WorkItem, _previous_row, _unique_stems, item_row, series_stem
from ulite_monai.io.dicom_series import add_instance, discover_inputs
from ulite_monai.io.pacs import DicomWebPacs, PacsAddress, open_store, retry
from ulite_monai.io.series_selection import SeriesSelector

__all__ = ["plan_remote", "Downloader", "Pusher", "DICOM_OUTPUTS"]

DICOM_OUTPUTS = ("seg", "rtstruct", "sr")


def plan_remote(pacs: DicomWebPacs, study_filters: dict, series_filters: dict, study_uids: list[str] | None,
                output_dir: Path, manifest: Manifest, model_version: str, rules: dict | None = None,
                all_matched: bool | None = None, overwrite: bool = False) -> Plan:
    """The batch plan for the series a DICOMweb query finds (see the module docstring)."""
    t0 = time.perf_counter()
    plan = Plan()
    candidates = []
    for st, se, _attrs in pacs.search_series(study_filters, series_filters, study_uids):
        key = f"dicom:{st}/{se}"
        prev = manifest.rows.get(key)
        if not overwrite and manifest.row_finished(prev, model_version, Path(output_dir)):
            plan.already_done += 1
            continue
        series: dict = {}
        non_image: dict = {}
        damaged: list = []
        skipped: list = []
        for ds in pacs.series_metadata(st, se):
            add_instance(ds, "", series, non_image, damaged, skipped)
        source = f"{pacs.address.text}/studies/{st}/series/{se}"
        if not series:
            why = next(iter(non_image.values())).reason if non_image else "no image instances"
            plan.skipped.append({"key": key, "kind": "dicom", "study_uid": st, "series_uid": se, "input": source,
                                 "status": "skipped", "reason": why})
            continue
        candidates.append((next(iter(series.values())), source))
    selected, not_selected = SeriesSelector(rules, all_matched=all_matched).select([s for s, _ in candidates])
    sources = {s.key: src for s, src in candidates}
    for s, src in candidates:
        if s.key in not_selected:
            row = item_row(WorkItem(s.key, "dicom", "", series=s, source=src))
            plan.skipped.append({**row, "status": "skipped", "reason": not_selected[s.key]})
    for sel in selected:
        s = sel.series
        it = WorkItem(s.key, "dicom", series_stem(s), series=s, selection=sel.selection_name, source=sources[s.key],
                      remote=True)
        plan.todo.append(it)
    _unique_stems(plan.todo, manifest)
    for it in plan.todo:
        it.previous_outputs = [p for p in ((_previous_row(manifest, it) or {}).get("outputs") or {}).values() if p]
    plan.discovery_s = time.perf_counter() - t0
    return plan


class Downloader:
    """``worker.fetch``: downloads a remote series (WADO-RS, streamed) into ``tmp_dir`` and reads its headers."""

    def __init__(self, pacs: DicomWebPacs, tmp_dir: Path, attempts: int = 3, delay_s: float = 1.0) -> None:
        self.pacs, self.tmp_dir, self.attempts, self.delay_s = pacs, Path(tmp_dir), attempts, delay_s

    def __call__(self, item: WorkItem) -> WorkItem:
        if not item.remote:
            return item
        s = item.series
        folder = self.tmp_dir / f"pull-{uuid.uuid4().hex}"
        item.download_dir = str(folder)

        def download() -> int:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            n = 0
            for n, ds in enumerate(self.pacs.iter_series(s.study_uid, s.series_uid), start=1):
                ds.save_as(folder / f"{n:05d}.dcm", enforce_file_format=True)
            return n

        t = time.perf_counter()
        n, _ = retry(download, self.attempts, self.delay_s)
        found = discover_inputs(folder)
        got = [x for x in found.series if x.key == item.key]
        if not got:
            raise RuntimeError(f"{item.source}: WADO-RS returned no instance of the series ({n} files)")
        item.series = got[0]
        item.download_s = time.perf_counter() - t
        item.downloaded_bytes = sum(f.stat().st_size for f in folder.iterdir())
        return item


class Pusher:
    """Sends a row's DICOM outputs to every destination with retries; records each object in the row."""

    def __init__(self, destinations: Sequence[PacsAddress], output_dir: Path, ca_bundle: str | None = None,
                 netrc_file: str | None = None, attempts: int = 3, delay_s: float = 1.0) -> None:
        self.destinations = list(destinations)
        self.out = Path(output_dir)
        self.stores = {d.text: open_store(d, ca_bundle, netrc_file) for d in self.destinations}
        self.attempts, self.delay_s = attempts, delay_s

    def pending(self, row: dict) -> bool:
        """Whether a finished row still has an object not stored at one of the destinations."""
        if row.get("status") != "done":
            return False
        ok = {(p["destination"], p["object"]) for p in row.get("push") or [] if p.get("status") == "ok"}
        return any((d, k) not in ok for d in self.stores for k in (row.get("outputs") or {}) if k in DICOM_OUTPUTS)

    def push(self, row: dict) -> dict:
        """Push the row's DICOM outputs not yet stored; returns the row with ``push`` and ``push_status``."""
        before = {(p["destination"], p["object"]): p for p in row.get("push") or [] if p.get("status") == "ok"}
        results = []
        t = time.perf_counter()
        for kind, rel in (row.get("outputs") or {}).items():
            if kind not in DICOM_OUTPUTS:
                continue
            ds = None
            for dest, store in self.stores.items():
                if (dest, kind) in before:
                    results.append(before[(dest, kind)])
                    continue
                ds = ds or pydicom.dcmread(self.out / rel)
                entry = {"destination": dest, "object": kind, "sop_instance_uid": str(ds.SOPInstanceUID)}
                try:
                    _, n = retry(lambda s=store, d=ds: s.store(d), self.attempts, self.delay_s)
                    entry.update(status="ok", attempts=n)
                except Exception as e:
                    entry.update(status="failed", attempts=self.attempts, error=str(e)[:300])
                results.append(entry)
        row = dict(row, push=results, push_s=round(time.perf_counter() - t, 4))
        row["push_status"] = "ok" if all(r["status"] == "ok" for r in results) else "failed"
        return row


def remove_download(item: WorkItem) -> None:
    if item.download_dir and os.path.isdir(item.download_dir):
        shutil.rmtree(item.download_dir, ignore_errors=True)
