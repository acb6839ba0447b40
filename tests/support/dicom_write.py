# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Write a volume as a single-frame CT or MR DICOM series (for tests, demos and validation).

The geometry is given as in SimpleITK (LPS): ``origin``, ``spacing`` (x, y, z) and a 3x3
``direction`` whose columns are the image x (row direction), y (column direction) and z axes.
The z axis may be anti-parallel to ``x cross y`` (a left-handed volume): each slice is written
at its physical position, and a reader has to sort along the normal to rebuild the grid.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

__all__ = ["write_dicom_series", "sitk_to_dicom_series"]

_SOP = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def _ds_str(v: float) -> str:
    s = f"{v:.10g}"
    if len(s) > 16:
        s = f"{v:.6e}" if abs(v) >= 1e-4 else "0"
    return s[:16]


def write_dicom_series(
    volume: np.ndarray,
    out_dir: str | os.PathLike,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    direction: np.ndarray | Sequence[float] | None = None,
    modality: str = "CT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_id: str = "ULITE-TEST",
    series_description: str = "generated",
    series_number: int = 1,
    rescale: tuple[float, float] | None = None,
    file_names: Sequence[str] | None = None,
    extra: dict | None = None,
) -> list[Path]:
    """Write ``volume`` (indexed ``[z, y, x]``, i.e. ``sitk.GetArrayFromImage`` order) as one file per slice.

    Args:
        volume: 3-D array of stored values (or physical values when ``rescale`` is given).
        out_dir: folder to write to (created).
        origin, spacing, direction: LPS geometry as in SimpleITK (direction row-major 3x3 or 9 values).
        modality: "CT" or "MR" (sets the SOP class).
        rescale: ``(slope, intercept)``; the stored value is ``(volume - intercept) / slope`` as int16.
        file_names: names for the slice files (default ``slice_0000.dcm`` ...), e.g. shuffled names.
        extra: additional attributes set on every slice (keyword -> value).

    Returns:
        the written paths, in z order.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3-D [z, y, x], got shape {vol.shape}")
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    sop_class = _SOP[modality]
    if rescale is None:
        stored = vol
        slope, intercept = 1.0, 0.0
    else:
        slope, intercept = rescale
        stored = np.round((vol.astype(np.float64) - intercept) / slope)
    if np.issubdtype(stored.dtype, np.floating) and not np.all(np.mod(stored, 1) == 0):
        raise ValueError("non-integer voxel values: pass rescale=(slope, intercept) to store them")
    stored = stored.astype(np.int16)
    now = datetime.datetime(2024, 1, 2, 3, 4, 5)
    paths = []
    for k in range(vol.shape[0]):
        pos = np.asarray(origin, dtype=np.float64) + k * float(spacing[2]) * d[:, 2]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        sop_uid = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "A0001"
        ds.Modality = modality
        ds.Manufacturer = "ulite-monai generator"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "ulite-monai generated study"
        ds.SeriesDescription = series_description
        ds.PatientName = "Test^Patient"
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds_str(v) for v in pos]
        ds.ImageOrientationPatient = [_ds_str(v) for v in np.concatenate([d[:, 0], d[:, 1]])]
        ds.SliceThickness = _ds_str(float(spacing[2]))
        ds.SliceLocation = _ds_str(float(np.dot(pos, np.cross(d[:, 0], d[:, 1]))))
        ds.PixelSpacing = [_ds_str(float(spacing[1])), _ds_str(float(spacing[0]))]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(vol.shape[1]), int(vol.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        if modality == "CT":
            ds.RescaleSlope = _ds_str(slope)
            ds.RescaleIntercept = _ds_str(intercept)
            ds.RescaleType = "HU"
            ds.KVP = "120"
            ds.AcquisitionNumber = 1
        else:
            if rescale is not None:
                ds.RescaleSlope = _ds_str(slope)
                ds.RescaleIntercept = _ds_str(intercept)
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.EchoTime = "10"
            ds.RepetitionTime = "500"
            ds.EchoTrainLength = 1
            ds.AcquisitionNumber = 1
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        name = file_names[k] if file_names is not None else f"slice_{k:04d}.dcm"
        path = out / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sitk_to_dicom_series(image, out_dir: str | os.PathLike, modality: str = "CT", **kwargs) -> list[Path]:
    """Write a SimpleITK image as a DICOM series in its own geometry (see :func:`write_dicom_series`).

    Float images are stored with a rescale slope that keeps 1/1000 of the value range.
    """
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image)
    if "rescale" not in kwargs and np.issubdtype(arr.dtype, np.floating) and not np.all(np.mod(arr, 1) == 0):
        lo, hi = float(arr.min()), float(arr.max())
        slope = max((hi - lo) / 60000.0, 1e-6)
        kwargs["rescale"] = (slope, lo + 30000.0 * slope)
    return write_dicom_series(
        arr,
        out_dir,
        origin=image.GetOrigin(),
        spacing=image.GetSpacing(),
        direction=np.asarray(image.GetDirection()).reshape(3, 3),
        modality=modality,
        **kwargs,
    )
