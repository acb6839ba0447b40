# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""2D images for ``LoadImage``: PNG/JPEG/TIFF/BMP, 2D NIfTI/NRRD/MHA, and single-frame DICOM images.

:class:`Image2DReader` picks the library by file: Pillow (through MONAI's ``PILReader``) for photos and
masks, SimpleITK (:class:`~ulite_monai.io.SITKReader`) for NIfTI/NRRD/MHA, pydicom for DICOM. Every path
returns the same layout as MONAI's readers: arrays in (x, y[, c]) order (column index first), colour
components last with ``original_channel_dim = -1``, grey images without a channel.

DICOM (secondary capture, VL photographic/dermoscopy, ultrasound, X-ray): pixels in their display form, as a
viewer shows them. Colour: RGB; YBR_* is converted to RGB; PALETTE COLOR goes through its lookup table
(16-bit tables scaled to 8 bits). Grey: the modality rescale is applied; MONOCHROME1 is flipped against the
stored bit range (not the image's own min/max), so that bright means dense as in MONOCHROME2. Pixel size
comes from PixelSpacing, else ImagerPixelSpacing, else an ultrasound region calibrated in cm; without any, 1
(pixels). Multi-frame files are refused with a message (a cine or a volume is not a 2D image).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import ImageReader, PILReader
from monai.utils import MetaKeys, ensure_tuple

from ulite_monai.io.sitk_reader import SITKReader

__all__ = ["Image2DReader", "read_dicom_image", "PIL_SUFFIXES", "is_dicom_file"]

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_SITK_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A ``.dcm`` file, or any file with the DICOM preamble (``DICM`` at byte 128)."""
    p = Path(path)
    if p.name.lower().endswith(".dcm"):
        return True
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _pixel_spacing(ds) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm, or None."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    for region in ds.get("SequenceOfUltrasoundRegions", []) or []:
        # units 3 = cm; physical deltas are per pixel
        if region.get("PhysicalUnitsXDirection") == 3 and region.get("PhysicalUnitsYDirection") == 3:
            dx, dy = float(region.get("PhysicalDeltaX", 0)), float(region.get("PhysicalDeltaY", 0))
            if dx > 0 and dy > 0:
                return 10.0 * dy, 10.0 * dx
    return None


def read_dicom_image(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """A single-frame DICOM image as ``(array (rows, columns[, 3]) float32, info)`` in display form.

    ``info`` holds ``spacing`` (row, column mm or None), ``photometric`` (as stored) and ``dataset``.

    Raises:
        ValueError: not a readable DICOM image, no pixel data, several frames, or a photometric
            interpretation that is not supported; the message names the file.
    """
    import pydicom

    p = Path(path)
    try:
        ds = pydicom.dcmread(str(p))
    except Exception as e:  # noqa: BLE001 - any parse error means: not a DICOM file we can read
        raise ValueError(f"{p}: not a readable DICOM file ({type(e).__name__}: {e}).") from e
    if "PixelData" not in ds:
        raise ValueError(f"{p}: DICOM object without pixel data (SOP class {ds.get('SOPClassUID', '?')}).")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(
            f"{p}: {frames} frames; a 2D model takes single-frame images (a cine or volume: export one frame, or "
            "segment the volume slice by slice with the slice-wise config)."
        )
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - missing decoder, truncated pixel data
        raise ValueError(f"{p}: cannot decode the pixel data ({type(e).__name__}: {e}).") from e
    if pi.startswith("YBR"):
        # pydicom 3 hands YBR pixel data over as RGB already; pydicom 2 does not
        if int(pydicom.__version__.split(".")[0]) < 3:
            from pydicom.pixel_data_handlers.util import convert_color_space

            arr = convert_color_space(arr, pi, "RGB")
        pi = "RGB"
    if pi == "PALETTE COLOR":
        try:
            from pydicom.pixels import apply_color_lut
        except ImportError:  # pydicom 2
            from pydicom.pixel_data_handlers.util import apply_color_lut
        arr = apply_color_lut(arr, ds)
        if arr.max() > 255:
            arr = arr / 257.0
        pi = "RGB"
    if pi == "RGB":
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"{p}: RGB image with unexpected pixel array shape {arr.shape}.")
        out = arr.astype(np.float32)
    elif pi in ("MONOCHROME1", "MONOCHROME2"):
        stored = arr.astype(np.float64)
        if pi == "MONOCHROME1":
            bits = int(ds.get("BitsStored", 8))
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if int(ds.get("PixelRepresentation", 0)) else (0, 2**bits - 1)
            stored = (lo + hi) - stored
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        out = (stored * slope + intercept).astype(np.float32)
    else:
        raise ValueError(f"{p}: photometric interpretation {pi} is not supported (RGB, YBR_*, PALETTE COLOR, "
                         "MONOCHROME1/2 are).")
    if out.ndim not in (2, 3):
        raise ValueError(f"{p}: pixel array of shape {out.shape} is not a 2D image.")
    return out, {"spacing": _pixel_spacing(ds), "photometric": str(ds.get("PhotometricInterpretation", "")),
                 "dataset": ds}


class _DicomImage:
    def __init__(self, path: str) -> None:
        self.path = path


class Image2DReader(ImageReader):
    """One reader for the 2D inputs a user has: photos and masks, 2D NIfTI/NRRD/MHA, single-frame DICOM.

    Args:
        kwargs: passed to MONAI's ``PILReader`` (e.g. ``converter``).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.pil = PILReader(**kwargs)
        self.sitk = SITKReader()

    def _reader_for(self, filename: str | os.PathLike) -> str:
        name = str(filename).lower()
        if name.endswith(PIL_SUFFIXES):
            return "pil"
        if name.endswith(_SITK_SUFFIXES):
            return "sitk"
        if is_dicom_file(filename):
            return "dicom"
        return ""

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        return all(self._reader_for(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs):
        files = ensure_tuple(data)
        if len(files) != 1:
            raise ValueError(f"Image2DReader reads one 2D image at a time, got {len(files)} files.")
        f = str(files[0])
        kind = self._reader_for(f)
        if kind == "pil":
            return kind, self.pil.read(f, **kwargs)
        if kind == "sitk":
            return kind, self.sitk.read(f, **kwargs)
        return kind, _DicomImage(f)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        kind, obj = img
        if kind == "pil":
            return self.pil.get_data(obj)
        if kind == "sitk":
            return self.sitk.get_data(obj)
        arr, info = read_dicom_image(obj.path)
        ds = info["dataset"]
        color = arr.ndim == 3
        arr = np.ascontiguousarray(np.swapaxes(arr, 0, 1))  # (rows, columns) -> (x, y) like MONAI's readers
        row_mm, col_mm = info["spacing"] or (1.0, 1.0)
        affine = np.diag([col_mm, row_mm, 1.0])
        meta = {
            MetaKeys.ORIGINAL_AFFINE: affine,
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(arr.shape[:2]),
            MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if color else float("nan"),
            "spacing": np.asarray([col_mm, row_mm]),
            "spacing_known": info["spacing"] is not None,
            "PhotometricInterpretation": info["photometric"],
            "Modality": str(ds.get("Modality", "")),
            "SOPInstanceUID": str(ds.get("SOPInstanceUID", "")),
            "SOPClassUID": str(ds.get("SOPClassUID", "")),
        }
        return arr, meta
