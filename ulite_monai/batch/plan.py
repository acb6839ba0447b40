# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Planning a batch: discover the inputs, select series, name outputs, decide what a rerun redoes.

Output names come from sanitised UIDs (DICOM) or the input's relative path (volume files), never from tag
text. Two inputs whose names collide (``dup.nii.gz`` and ``dup.nrrd``, ``a b`` and ``a_b``, names differing in
case only) or a name an earlier run gave another input get ``<name>__<hash of the key>`` instead, so no two
inputs ever share an output. The plan also yields a ``skipped`` manifest row for every file or series not
taken, with the reason. The batch's own output folder is never read as input.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ulite_monai.batch.manifest import Manifest
from ulite_monai.io.dicom_series import (
    DicomSeries,
    ImageInstance,
    SeriesRejectedError,
    discover_inputs,
    sanitize_name,
)
from ulite_monai.io.series_selection import SeriesSelector

__all__ = ["WorkItem", "Plan", "plan_batch", "item_row", "failed_row", "failure_reason", "output_stem", "series_stem",
           "VOLUME_SUFFIXES", "OUTPUT_SUFFIXES"]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# every output a series can have: <out_stem><suffix>
OUTPUT_SUFFIXES = (".seg.dcm", ".rtstruct.dcm", ".sr.dcm", ".qc.png", ".overlay.png", ".nii.gz", ".nii", ".nrrd",
                   ".mha", ".png")


def output_stem(rel_path: str) -> str:
    """``a/b.seg.dcm`` -> ``a/b``: an output path without its output suffix."""
    for suf in OUTPUT_SUFFIXES:
        if rel_path.lower().endswith(suf):
            return rel_path[: -len(suf)]
    return rel_path


@dataclass
class WorkItem:
    """One series, volume file or 2D image to segment.

    Attributes:
        key: manifest key (``dicom:<study>/<series>`` of a series, ``dicom:<study>/<series>/<instance>`` of a 2D
            DICOM image, or ``file:<relative path>``).
        kind: ``"dicom"`` (a series), ``"file"`` (a volume file), ``"image"`` (a PNG/JPEG/TIFF/BMP file) or
            ``"dicom2d"`` (a single-frame 2D DICOM image); the last two for a 2D bundle.
        out_stem: output path relative to the output folder, without extension.
        series: the DICOM series (``kind == "dicom"``).
        path: the file to read (``kind`` ``"file"``, ``"image"``, ``"dicom2d"``).
        image: the 2D DICOM image's header facts (``kind == "dicom2d"``).
        selection: the selection rule that took it.
        previous_outputs: output paths (relative to the output folder) of this key's last manifest row; a
            new result replaces them all.
        source: where the series comes from when not a local folder (a DICOMweb series URL).
        remote: the series is downloaded when read (``batch/remote.py``).
    """

    key: str
    kind: str
    out_stem: str
    series: DicomSeries | None = None
    path: str | None = None
    image: ImageInstance | None = None
    selection: str = ""
    previous_outputs: list[str] = field(default_factory=list)
    source: str = ""
    remote: bool = False
    download_dir: str | None = None
    download_s: float = 0.0
    downloaded_bytes: int = 0


@dataclass
class Plan:
    """What a batch run does: ``todo`` in order, ``skipped`` rows to record, ``already_done`` count."""

    todo: list[WorkItem] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    already_done: int = 0
    discovery_s: float = 0.0


def item_row(item: WorkItem) -> dict[str, Any]:
    """The manifest fields that describe ``item`` (what it is and where it came from)."""
    s = item.series
    row: dict[str, Any] = {"key": item.key, "kind": item.kind}
    if s is not None:
        row.update(
            study_uid=s.study_uid,
            series_uid=s.series_uid,
            modality=s.modality,
            series_description=s.description[:64],
            input=item.source or (os.path.dirname(s.files[0]) if s.files else ""),
            slices=s.num_slices,
        )
    elif item.image is not None:
        im = item.image
        row.update(study_uid=im.study_uid, series_uid=im.series_uid, sop_instance_uid=im.sop_instance_uid,
                   modality=im.modality, series_description=im.description[:64], input=item.path)
    else:
        row.update(input=item.path)
    row["selection"] = item.selection
    return row


def failed_row(item: WorkItem, model_version: str, reason: str) -> dict[str, Any]:
    """The manifest row of ``item`` when it could not be segmented, with the reason."""
    return {**item_row(item), "model_version": model_version, "status": "failed", "reason": reason}


_WRAPPED = re.compile(r"applying transform <?([\w.]+)")


def failure_reason(e: BaseException) -> str:
    """One line for the manifest saying why a series failed: the underlying error, not MONAI's wrapper
    ("applying transform <...>"), with the transform it came from, e.g. ``LoadImaged: cannot read ...``."""
    where = []
    while True:
        m = _WRAPPED.match(str(e).strip())
        inner = e.__cause__ or e.__context__
        if not m or inner is None:
            break
        name = m.group(1).rsplit(".", 1)[-1]
        if name not in where:
            where.append(name)
        e = inner
    text = str(e).strip().splitlines()
    line = text[-1] if isinstance(e, RuntimeError) and "Traceback" in str(e) else " ".join(text)
    if not isinstance(e, (SeriesRejectedError, FileNotFoundError, ValueError, RuntimeError)) or not line:
        line = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return (f"{where[-1]}: " if where else "") + line[:500]


def _volume_stem(rel: str, folder: str = "volumes", suffixes: tuple[str, ...] = VOLUME_SUFFIXES) -> str:
    base = rel
    for suf in suffixes:
        if base.lower().endswith(suf):
            base = base[: -len(suf)]
            break
    return f"{folder}/" + "/".join(sanitize_name(part) for part in Path(base).parts)


def _unique_stems(items: list[WorkItem], manifest: Manifest) -> None:
    """Give colliding output names (case-insensitively, also against earlier runs' rows) a hash suffix."""
    claimed: dict[str, set[str]] = {}
    for key, row in manifest.rows.items():
        for p in (row.get("outputs") or {}).values():
            if p:
                claimed.setdefault(output_stem(p).casefold(), set()).add(key)
    count: dict[str, int] = {}
    for it in items:
        count[it.out_stem.casefold()] = count.get(it.out_stem.casefold(), 0) + 1
    for it in items:
        stem = it.out_stem.casefold()
        own = {it.key} | ({it.series.legacy_key} if it.series is not None else set())
        if count[stem] > 1 or claimed.get(stem, set()) - own:
            it.out_stem = f"{it.out_stem}__{hashlib.sha1(it.key.encode()).hexdigest()[:8]}"


def series_stem(series: DicomSeries) -> str:
    """``<study UID>/<series UID>`` (sanitised): a DICOM series' output name."""
    return f"{sanitize_name(series.study_uid)}/{sanitize_name(series.series_uid)}"


def _previous_row(manifest: Manifest, item: WorkItem) -> dict | None:
    row = manifest.rows.get(item.key)
    if row is None and item.series is not None:  # manifests written before keys carried the study UID
        old = manifest.rows.get(item.series.legacy_key)
        row = old if old and old.get("study_uid") == item.series.study_uid else None
    return row


def plan_batch(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    manifest: Manifest,
    model_version: str,
    rules: dict | None = None,
    all_matched: bool | None = None,
    overwrite: bool = False,
    images_2d: bool = False,
) -> Plan:
    """Discover inputs under ``input_dir``, select series by ``rules``, and drop what is already finished.

    Args:
        input_dir: a folder tree of DICOM files and volume files, or one file.
        output_dir: the batch output folder (finished outputs are looked up there; never read as input).
        manifest: the output folder's manifest (earlier runs).
        model_version: the pipeline's model version; a series finished with another one is redone.
        rules: MONAI Deploy selection rules (parsed); ``None`` takes every image series.
        all_matched: per study and selection, keep every matching series (``False``: the first only).
        overwrite: redo finished series too.
        images_2d: the model is 2D: every single-frame 2D DICOM image and every PNG/JPEG/TIFF/BMP file is an
            item (image by image, no series selection), DICOM series are skipped with the reason (a 2D model
            takes them slice by slice through the bundle's slice-wise config), volume files are read as 2D
            images (a 3D one then fails with its reason).
    """
    import time

    t0 = time.perf_counter()
    plan = Plan()
    found = discover_inputs(input_dir, exclude=[output_dir], images_2d=images_2d)
    if images_2d:
        selected = []
        not_selected = {s.key: "a DICOM series; this bundle's model is 2D: merge its inference_slicewise.json "
                               "(--config) to segment series slice by slice" for s in found.series}
    else:
        selected, not_selected = SeriesSelector(rules, all_matched=all_matched).select(found.series)
    in_root = Path(input_dir)
    for sk in found.skipped:
        rel = os.path.relpath(sk.path, in_root) if in_root.is_dir() else sk.path
        plan.skipped.append({
            "key": sk.key if sk.series_uid else f"file:{rel}",
            "kind": "dicom" if sk.series_uid else "file",
            "study_uid": sk.study_uid,
            "series_uid": sk.series_uid,
            "input": rel,
            "status": "skipped",
            "reason": sk.reason,
        })
    for s in found.series:
        if s.key in not_selected:
            row = item_row(WorkItem(s.key, "dicom", "", series=s))
            plan.skipped.append({**row, "status": "skipped", "reason": not_selected[s.key]})
    items = [
        WorkItem(sel.series.key, "dicom", series_stem(sel.series), series=sel.series, selection=sel.selection_name)
        for sel in selected
    ]
    for p in found.volume_files:
        rel = os.path.relpath(p, in_root) if in_root.is_dir() else os.path.basename(p)
        items.append(WorkItem(f"file:{rel}", "file", _volume_stem(rel), path=p, selection="volume file"))
    for p in found.image_files:
        rel = os.path.relpath(p, in_root) if in_root.is_dir() else os.path.basename(p)
        stem = _volume_stem(rel, "images", (".png", ".jpg", ".jpeg", ".tiff", ".tif", ".bmp"))
        items.append(WorkItem(f"file:{rel}", "image", stem, path=p, selection="image file"))
    for im in found.images:
        stem = "/".join(sanitize_name(u) for u in (im.study_uid, im.series_uid, im.sop_instance_uid))
        items.append(WorkItem(im.key, "dicom2d", stem, path=im.path, image=im, selection="2D DICOM image"))
    _unique_stems(items, manifest)
    for it in items:
        prev = _previous_row(manifest, it)
        it.previous_outputs = [p for p in (prev or {}).get("outputs", {}).values() if p]
        if not overwrite and prev is not None and manifest.row_finished(prev, model_version, Path(output_dir)):
            plan.already_done += 1
        else:
            plan.todo.append(it)
    plan.discovery_s = time.perf_counter() - t0
    return plan
