# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""RT Structure Set (RTSTRUCT) from a label volume: closed planar contours on the source planes; and back.

One ROI per segment (names and SNOMED codes as in the SEG), one CLOSED_PLANAR contour per connected outline
on each source plane, each referencing its source image (and frame of a multi-frame source). Outlines come
from marching squares at level 0.5 (``skimage.measure.find_contours``) in pixel coordinates of the plane,
mapped to patient coordinates with that plane's ImagePositionPatient, ImageOrientationPatient and
PixelSpacing. They pass half-way between inside and outside pixel centres, so filling them with the
even-odd rule (holes are contours inside contours) gives back the label at every pixel centre:
:func:`rtstruct_to_labels` does that, and the tests compare the two (Dice against the label).

highdicom writes SEG and SR but no RTSTRUCT; rt-utils, the usual helper, takes pixel spacing in the wrong
order for non-square pixels and reads the series from a folder itself, so this is written on pydicom.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from ulite_monai.io.dicom_seg import SegmentInfo
from ulite_monai.io.dicom_series import DicomFrame, SeriesVolume
from ulite_monai.utils import save_atomically

__all__ = ["RTSTRUCT_SOP_CLASS", "build_rtstruct", "write_rtstruct", "rtstruct_to_labels", "source_plane_labels",
           "plane_contours"]

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_STUDY_REF_CLASS = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired; still what RT objects cite)
_COLOURS = [[255, 64, 64], [64, 200, 64], [64, 128, 255], [255, 200, 0], [200, 64, 255], [0, 200, 200]]
_COPY_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                       "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription")


def plane_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a 2-D mask as (n, 2) arrays of (row, column) pixel coordinates (last point not repeated)."""
    from skimage.measure import find_contours

    padded = np.pad(np.asarray(mask, dtype=np.uint8), 1)
    return [c[:-1] - 1.0 for c in find_contours(padded, 0.5) if len(c) >= 4]


def _to_patient(rc: np.ndarray, frame: DicomFrame) -> np.ndarray:
    row_dir, col_dir = frame.orientation[:3], frame.orientation[3:]
    return (frame.position[None] + rc[:, 1:2] * frame.pixel_spacing[1] * row_dir[None]
            + rc[:, 0:1] * frame.pixel_spacing[0] * col_dir[None])


def _ds(v: float) -> str:
    text = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _image_ref(volume: SeriesVolume, frame: DicomFrame) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = volume.datasets[frame.sop_instance_uid].SOPClassUID
    item.ReferencedSOPInstanceUID = frame.sop_instance_uid
    if frame.frame_index is not None:
        item.ReferencedFrameNumber = frame.frame_index + 1
    return item


def build_rtstruct(
    labels: np.ndarray,
    volume: SeriesVolume,
    segments: Sequence[SegmentInfo],
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 9902,
    series_description: str = "ulite-monai contours",
    manufacturer: str = "ulite-monai",
) -> Dataset | None:
    """The RTSTRUCT dataset for ``labels`` (indexed like ``volume.array``), or None when no segment has a voxel."""
    per_plane = labels[volume.frame_to_slice]  # one label plane per source plane, in sorted order
    src = volume.datasets[volume.frames[0].sop_instance_uid]
    for_uid = str(src.get("FrameOfReferenceUID", ""))
    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = src.get("SpecificCharacterSet", "ISO_IR 100")
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for kw in _COPY_PATIENT_STUDY:
        setattr(ds, kw, src.get(kw, ""))
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description[:64]
    ds.OperatorsName = ""
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = algorithm_name[:64]
    ds.SoftwareVersions = str(algorithm_version)[:64]
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "ULITE"
    ds.StructureSetName = algorithm_name[:64]
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = str(src.SeriesInstanceUID)
    seen: set = set()
    series_ref.ContourImageSequence = DicomSequence()
    for f in volume.frames:
        if (f.sop_instance_uid, f.frame_index) not in seen:
            seen.add((f.sop_instance_uid, f.frame_index))
            series_ref.ContourImageSequence.append(_image_ref(volume, f))
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _STUDY_REF_CLASS
    study_ref.ReferencedSOPInstanceUID = str(src.StudyInstanceUID)
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    for_ref = Dataset()
    for_ref.FrameOfReferenceUID = for_uid
    for_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([for_ref])
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    any_contour = False
    for i, seg in enumerate(segments, start=1):  # ROI number = label value
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = seg.number, for_uid, seg.label[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{algorithm_name} {algorithm_version}"[:64]
        ds.StructureSetROISequence.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = seg.number
        rc.ROIDisplayColor = _COLOURS[(i - 1) % len(_COLOURS)]
        contours = []
        for k, frame in enumerate(volume.frames):
            for outline in plane_contours(per_plane[k] == seg.number):
                c = Dataset()
                c.ContourImageSequence = DicomSequence([_image_ref(volume, frame)])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(outline)
                c.ContourNumber = len(contours) + 1
                c.ContourData = [_ds(v) for v in _to_patient(outline, frame).ravel()]
                contours.append(c)
        if contours:
            rc.ContourSequence = DicomSequence(contours)
            any_contour = True
        ds.ROIContourSequence.append(rc)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = i, seg.number
        obs.RTROIInterpretedType = "ORGAN" if seg.category[0] == "91723000" else ""
        obs.ROIInterpreter = ""
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = seg.type
        obs.RTROIIdentificationCodeSequence = DicomSequence([code])
        ds.RTROIObservationsSequence.append(obs)
    return ds if any_contour else None


def write_rtstruct(labels: np.ndarray, volume: SeriesVolume, segments: Sequence[SegmentInfo],
                   out_path: str | os.PathLike, algorithm_name: str, algorithm_version: str, **kwargs) -> Path | None:
    """Write :func:`build_rtstruct` to ``out_path`` (temporary file + rename); None (nothing written) if empty."""
    ds = build_rtstruct(labels, volume, segments, algorithm_name, algorithm_version, **kwargs)
    if ds is None:
        return None
    save_atomically(lambda tmp: ds.save_as(tmp, enforce_file_format=True), out_path)
    return Path(out_path)


def rtstruct_to_labels(ds: Dataset, volume: SeriesVolume) -> np.ndarray:
    """Fill an RTSTRUCT's contours back onto the source planes (even-odd rule): a label array like
    ``labels[volume.frame_to_slice]`` (one plane per source plane, sorted); a ROI's number is its label value."""
    from skimage.draw import polygon

    index = {(f.sop_instance_uid, f.frame_index): k for k, f in enumerate(volume.frames)}
    shape = volume.array.shape[1:]
    out = np.zeros((len(volume.frames),) + shape, dtype=np.uint8)
    for rc in ds.ROIContourSequence:
        planes: dict[int, np.ndarray] = {}
        for c in rc.get("ContourSequence", []):
            ref = c.ContourImageSequence[0]
            frame_no = int(ref.ReferencedFrameNumber) - 1 if "ReferencedFrameNumber" in ref else None
            k = index[(str(ref.ReferencedSOPInstanceUID), frame_no)]
            f = volume.frames[k]
            pts = np.asarray([float(v) for v in c.ContourData]).reshape(-1, 3) - f.position[None]
            rows = pts @ f.orientation[3:] / f.pixel_spacing[0]
            cols = pts @ f.orientation[:3] / f.pixel_spacing[1]
            fill = np.zeros(shape, dtype=bool)
            rr, cc = polygon(rows, cols, shape)
            fill[rr, cc] = True
            planes[k] = planes.get(k, np.zeros(shape, dtype=bool)) ^ fill
        for k, m in planes.items():
            out[k][m] = int(rc.ReferencedROINumber)
    return out


def source_plane_labels(labels: np.ndarray, volume: SeriesVolume) -> np.ndarray:
    """``labels`` (like ``volume.array``) at each source plane, sorted: what :func:`rtstruct_to_labels` returns."""
    return np.asarray(labels)[volume.frame_to_slice]

