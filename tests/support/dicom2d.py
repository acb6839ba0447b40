# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Single-frame 2D DICOM images as scanners and capture devices write them (tests of the 2D readers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SOP_CLASSES = {
    "SC": "1.2.840.10008.5.1.4.1.1.7",  # secondary capture
    "VL": "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL photographic (dermoscopy)
    "US": "1.2.840.10008.5.1.4.1.1.6.1",  # ultrasound
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # digital X-ray
}


def write_dicom_image(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", kind: str = "SC",
                      bits: int = 8, extra: dict | None = None, frames: int = 1) -> Path:
    """Write ``pixels`` (rows, columns[, 3]) as stored values under ``photometric`` (RGB, YBR_FULL, PALETTE COLOR,
    MONOCHROME1/2); RGB input is converted for YBR_FULL; PALETTE COLOR takes index pixels and ``extra`` LUTs."""
    from pydicom.pixels import convert_color_space

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[kind]
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASSES[kind], ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = {"SC": "OT", "VL": "XC", "US": "US", "DX": "DX"}[kind]
    ds.PatientID, ds.PatientName = "ULITE-2D", "Test^TwoD"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "1", "", ""
    ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 1, 1, "ulite-test"
    arr = np.asarray(pixels)
    if photometric == "YBR_FULL":
        arr = convert_color_space(arr.astype(np.uint8), "RGB", "YBR_FULL")
    color = photometric in ("RGB", "YBR_FULL")
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    dtype = np.uint8 if bits <= 8 else np.uint16
    if frames > 1:
        ds.NumberOfFrames = frames
        arr = np.stack([arr] * frames)
    ds.PixelData = np.ascontiguousarray(arr.astype(dtype)).tobytes()
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.save_as(str(path), enforce_file_format=True)
    return Path(path)


def palette(n: int = 256) -> dict:
    """A 16-bit PALETTE COLOR lookup table (red ramp, green reversed ramp, blue constant) as DICOM attributes."""
    ramp = np.linspace(0, 65535, n).astype(np.uint16)
    return {
        "RedPaletteColorLookupTableDescriptor": [n, 0, 16],
        "GreenPaletteColorLookupTableDescriptor": [n, 0, 16],
        "BluePaletteColorLookupTableDescriptor": [n, 0, 16],
        "RedPaletteColorLookupTableData": ramp.tobytes(),
        "GreenPaletteColorLookupTableData": ramp[::-1].copy().tobytes(),
        "BluePaletteColorLookupTableData": np.full(n, 32768, np.uint16).tobytes(),
    }
