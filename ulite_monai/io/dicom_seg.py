# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""DICOM Segmentation (SEG) objects from a label volume, written with highdicom.

The SEG references every source instance, shares the source Frame of Reference, and carries
one segment per non-background label with coded concepts (SNOMED CT through pydicom's code
dictionary) and an algorithm identification (bundle name and version).

Segments come from the bundle metadata ``network_data_format.outputs.pred.channel_def``
(``{"0": "background", "1": "spleen"}``). A value may also be an object
``{"label": "tumour", "category": ["49755003", "SCT", "Morphologically Abnormal Structure"],
"type": ["108369006", "SCT", "Neoplasm"]}`` to give the codes explicitly. A plain name is looked up
in pydicom's SNOMED CT dictionary (``"spleen"`` -> Spleen); names that are not found are coded as
category/type "Tissue" and keep their text in SegmentLabel.

Empty predictions: :func:`write_dicom_seg` returns None and writes nothing when no voxel of any
segment is set (the batch records status ``empty``), because a SEG without a single segmented
frame is of no use in a viewer and some archives reject it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ulite_monai.io.dicom_series import SeriesVolume
from ulite_monai.utils import save_atomically

__all__ = ["SegmentInfo", "SEG_TYPES", "segments_from_channel_def", "build_dicom_seg", "build_dicom_seg_2d",
           "write_dicom_seg", "label_volume_to_source_frames"]

_BACKGROUND = {"background", "bg", "_background_", "none", "other"}
_ABNORMAL = {"lesion", "tumor", "tumour", "neoplasm", "mass", "nodule", "cyst", "metastasis", "abnormal"}


@dataclass
class SegmentInfo:
    number: int  # label value in the label volume (1..N)
    label: str
    category: tuple[str, str, str]  # (value, scheme designator, meaning)
    type: tuple[str, str, str]


def _sct_lookup(name: str):
    from pydicom.sr.codedict import codes

    keyword = "".join(part.capitalize() for part in name.replace("-", " ").replace("_", " ").split())
    try:
        return getattr(codes.SCT, keyword)
    except AttributeError:
        return None


def _code(value: Any, where: str) -> tuple[str, str, str]:
    if isinstance(value, Mapping):
        value = [value.get("value") or value.get("code"), value.get("scheme_designator", "SCT"), value.get("meaning")]
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(value):
        raise ValueError(f"{where}: a code must be [value, scheme designator, meaning], got {value!r}")
    return tuple(str(v) for v in value)  # type: ignore[return-value]


def segments_from_channel_def(
    channel_def: Mapping[str, Any] | None, num_labels: int | None = None
) -> list[SegmentInfo]:
    """Segments for labels 1..N from a bundle ``channel_def`` (label index -> name or code object).

    Without a channel_def, ``num_labels`` generic segments "label 1".."label N" are made.
    """
    items: dict[int, Any] = {}
    for k, v in (channel_def or {}).items():
        try:
            items[int(k)] = v
        except (TypeError, ValueError):
            raise ValueError(f"channel_def key {k!r} is not a label number") from None
    if not items and num_labels:
        items = {i: f"label {i}" for i in range(1, num_labels + 1)}
    segments = []
    for number in sorted(items):
        v = items[number]
        name = v.get("label", v.get("name", f"label {number}")) if isinstance(v, Mapping) else str(v)
        if number == 0 or name.strip().lower() in _BACKGROUND:
            continue
        if isinstance(v, Mapping) and "type" in v:
            typ = _code(v["type"], f"channel_def[{number}].type")
            cat = _code(v.get("category", ["85756007", "SCT", "Tissue"]), f"channel_def[{number}].category")
        else:
            found = _sct_lookup(name)
            if found is not None:
                typ = (found.value, found.scheme_designator, found.meaning)
                abnormal = name.strip().lower() in _ABNORMAL
                cat = (
                    ("49755003", "SCT", "Morphologically Abnormal Structure")
                    if abnormal
                    else (
                        "91723000",
                        "SCT",
                        "Anatomical Structure",
                    )
                )
            else:
                typ = cat = ("85756007", "SCT", "Tissue")
        segments.append(SegmentInfo(number, name[:64], cat, typ))
    return segments


def label_volume_to_source_frames(labels: np.ndarray, volume: SeriesVolume) -> tuple[list, np.ndarray]:
    """Source datasets and the matching label frames, in the order highdicom expects.

    Single-frame series: one dataset per plane, in slice-normal order. A multi-frame source: one
    dataset, frames in its own frame order.
    """
    if labels.shape != volume.array.shape:
        raise ValueError(f"label volume {labels.shape} does not match the series volume {volume.array.shape}")
    per_frame = labels[volume.frame_to_slice]  # one label plane per source plane (sorted order)
    if all(f.frame_index is None for f in volume.frames):
        return [volume.datasets[f.sop_instance_uid] for f in volume.frames], per_frame
    if len({f.sop_instance_uid for f in volume.frames}) != 1:
        raise ValueError("series mixing several multi-frame instances: not supported for SEG")
    out = np.zeros_like(per_frame)
    for i, f in enumerate(volume.frames):
        out[f.frame_index] = per_frame[i]
    return [volume.datasets[volume.frames[0].sop_instance_uid]], out


SEG_TYPES = ("binary", "labelmap")


def build_dicom_seg(
    labels: np.ndarray,
    volume: SeriesVolume,
    segments: Sequence[SegmentInfo],
    algorithm_name: str,
    algorithm_version: str,
    seg_type: str = "binary",
    series_number: int = 9901,
    series_description: str = "ulite-monai segmentation",
    manufacturer: str = "ulite-monai",
    software_version: str | None = None,
):
    """The SEG for ``labels`` (indexed like ``volume.array``) as a highdicom ``Segmentation``, or None if empty.

    Args:
        labels: integer label volume; value ``s.number`` marks segment ``s``.
        volume: the series volume the labels belong to (source datasets and frame mapping).
        segments: segments to encode (labels without a segment are dropped); SEG segment ``i`` (1-based) is
            ``segments[i - 1]``.
        algorithm_name, algorithm_version: recorded in each segment's algorithm identification.
        seg_type: ``"binary"`` (one frame per segment and source plane that holds it; every viewer reads it) or
            ``"labelmap"`` (Label Map Segmentation Storage, DICOM 2024: one frame per source plane holding
            any label, the label value per pixel; compact for multi-class results, newer readers only).
    """
    sources, frames = label_volume_to_source_frames(np.asarray(labels), volume)
    return _segmentation(sources, frames, segments, algorithm_name, algorithm_version, seg_type, series_number,
                         series_description, manufacturer, software_version)


def build_dicom_seg_2d(
    labels: np.ndarray,
    source,
    segments: Sequence[SegmentInfo],
    algorithm_name: str,
    algorithm_version: str,
    seg_type: str = "binary",
    series_number: int = 9901,
    series_description: str = "ulite-monai segmentation",
    manufacturer: str = "ulite-monai",
    software_version: str | None = None,
):
    """The SEG of one single-frame 2D image (secondary capture, VL photograph, ultrasound, X-ray), or None.

    Args:
        labels: integer labels ``(rows, columns)`` on the image's pixel grid.
        source: the image's pydicom dataset (with pixel data).
        segments, algorithm_name, ...: as :func:`build_dicom_seg`.

    Images without a patient-based frame of reference are referenced by their pixel matrix alone; the SEG
    then carries an empty PatientOrientation, as the General Image module asks.
    """
    labels = np.asarray(labels)
    if labels.shape != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"label {labels.shape} does not match the image's {source.Rows}x{source.Columns} pixels")
    seg = _segmentation([source], labels[None], segments, algorithm_name, algorithm_version, seg_type, series_number,
                        series_description, manufacturer, software_version)
    if seg is not None and "ImageOrientationPatient" not in seg and "PatientOrientation" not in seg:
        seg.PatientOrientation = source.get("PatientOrientation", "")
    return seg


def _segmentation(sources, frames, segments, algorithm_name, algorithm_version, seg_type, series_number,
                  series_description, manufacturer, software_version):
    """A highdicom ``Segmentation`` of label ``frames`` (one per source frame) over ``sources``, or None."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    if not segments:
        raise ValueError("no segments to write: the bundle metadata names no foreground label")
    if seg_type not in SEG_TYPES:
        raise ValueError(f"unknown SEG type {seg_type!r}; choose from {SEG_TYPES}")
    numbers = [s.number for s in segments]
    frames = np.where(np.isin(frames, numbers), frames, 0)
    if not np.any(frames):
        return None
    # highdicom wants consecutive segment numbers 1..N: renumber labels in that order.
    remap = np.zeros(int(frames.max()) + 1, dtype=np.uint8)
    for i, s in enumerate(segments, start=1):
        if s.number < len(remap):
            remap[s.number] = i
    frames = remap[frames]
    algo = hd.AlgorithmIdentificationSequence(
        name=algorithm_name[:64], family=codes.DCM.ArtificialIntelligence, version=str(algorithm_version)[:64]
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=s.label,
            segmented_property_category=hd.sr.CodedConcept(*s.category),
            segmented_property_type=hd.sr.CodedConcept(*s.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
        )
        for i, s in enumerate(segments, start=1)
    ]
    kind = hd.seg.SegmentationTypeValues.LABELMAP if seg_type == "labelmap" else hd.seg.SegmentationTypeValues.BINARY
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames.astype(np.uint8),
        segmentation_type=kind,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name[:64],
        software_versions=str(software_version or algorithm_version)[:64],
        device_serial_number="0",
        content_description=series_description[:64],
        content_label="SEGMENTATION",
        series_description=series_description[:64],
    )


def write_dicom_seg(
    labels: np.ndarray,
    volume: SeriesVolume,
    segments: Sequence[SegmentInfo],
    out_path: str | os.PathLike,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 9901,
    series_description: str = "ulite-monai segmentation",
    manufacturer: str = "ulite-monai",
    software_version: str | None = None,
    seg_type: str = "binary",
) -> Path | None:
    """Write the DICOM SEG of :func:`build_dicom_seg` to ``out_path`` (temporary file + rename).

    Returns:
        the written path, or None if no voxel belongs to any segment (nothing is written).
    """
    seg = build_dicom_seg(labels, volume, segments, algorithm_name, algorithm_version, seg_type=seg_type,
                          series_number=series_number, series_description=series_description,
                          manufacturer=manufacturer, software_version=software_version)
    if seg is None:
        return None
    out_path = Path(out_path)
    save_atomically(seg.save_as, out_path)
    return out_path
