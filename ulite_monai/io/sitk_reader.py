# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""A SimpleITK :class:`monai.data.ImageReader` for ``LoadImage``/``LoadImaged``.

MONAI ships an ITK-Python reader but none for SimpleITK. This one opens everything SimpleITK
opens (NIfTI, NRRD, MHA/MHD, ...) and DICOM series folders (GDCM sorts the slices along the
slice normal, so left-handed and reversed stacks come out in the right physical order).

Geometry: SimpleITK reports direction/origin in LPS. The reader converts the affine to RAS
(``affine_lps_to_ras=True``, the MONAI default) here, so the pipeline works in RAS and
``SaveImage`` writes NIfTI with the source geometry. Arrays are returned in (x, y, z) index
order (SimpleITK's numpy view is (z, y, x) and is transposed), matching MONAI's other readers.

Example::

    LoadImaged(keys="image", reader="ulite_monai.io.sitk_reader.SITKReader")
    LoadImaged(keys="image", reader=SITKReader(series_uid="1.2.3..."))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import ImageReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.data.utils import orientation_ras_lps
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

__all__ = ["SITKReader", "read_sitk_image", "check_nifti_complete", "SUPPORTED_SUFFIXES"]

SUPPORTED_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".ima")


def read_sitk_image(path: str | os.PathLike, series_uid: str | None = None, pixel_type=None):
    """Read one file or one DICOM series folder with SimpleITK; errors name the path.

    Args:
        path: image file, or a folder holding one DICOM series (or several: then ``series_uid``).
        series_uid: SeriesInstanceUID to pick when a folder holds more than one series.
        pixel_type: optional SimpleITK pixel type to read as (e.g. ``sitk.sitkFloat32``).

    Raises:
        FileNotFoundError: ``path`` does not exist, or a folder holds no DICOM series.
        ValueError: a folder holds several series and ``series_uid`` does not pick one.
        RuntimeError: SimpleITK cannot read the file (corrupt or unsupported).
    """
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image not found: {p}. Check the path in the datalist or the input argument.")
    kwargs = {} if pixel_type is None else {"outputPixelType": pixel_type}
    if p.is_dir():
        ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p)) or ())
        if not ids:
            raise FileNotFoundError(
                f"no DICOM series found in folder {p}: give a folder of DICOM slices of one series, "
                "or an image file (NIfTI, NRRD, MHA)."
            )
        if series_uid is not None:
            if series_uid not in ids:
                raise ValueError(f"series {series_uid} not found in {p}; series present: {ids}.")
            uid = series_uid
        elif len(ids) == 1:
            uid = ids[0]
        else:
            raise ValueError(
                f"folder {p} holds {len(ids)} DICOM series {ids}: pass series_uid=... to the reader "
                "or put each series in its own folder (see ulite_monai.io series selection)."
            )
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), uid)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        if pixel_type is not None:
            reader.SetOutputPixelType(pixel_type)
        try:
            img = reader.Execute()
        except RuntimeError as e:
            raise RuntimeError(f"cannot read DICOM series {uid} in {p}: {str(e).strip().splitlines()[-1]}") from e
        img.SetMetaData("series_uid", uid)
        return img
    check_nifti_complete(p)
    _check_detached_data(p)
    try:
        return sitk.ReadImage(str(p), **kwargs)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()
        raise RuntimeError(
            f"cannot read image file {p} ({msg[-1] if msg else 'unknown error'}): is it a complete NIfTI/NRRD/MHA/"
            "DICOM file? Re-export or remove it from the datalist."
        ) from e


def check_nifti_complete(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` if a ``.nii``/``.nii.gz`` file holds fewer bytes than its header promises.

    SimpleITK reads a truncated NIfTI without complaint and fills the missing voxels with zeros. The check is
    cheap: an uncompressed file's size, or a gzip file's trailer (the uncompressed size modulo 2**32); only when
    the trailer disagrees is the gzip stream read through to tell a cut file from a multi-member one.
    """
    import gzip
    import struct

    import nibabel as nib

    p = Path(path)
    name = p.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        header = nib.load(str(p)).header
        n_bytes = int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
        expected = int(header.get_data_offset()) + n_bytes
    except Exception as e:  # a header that does not parse: SimpleITK will say so
        raise ValueError(f"cannot read image file {p}: NIfTI header unreadable ({type(e).__name__}: {e}); "
                         "re-export or remove the file.") from e
    what = f"image file {p} is truncated"
    if name.endswith(".nii"):
        size = p.stat().st_size
        if size < expected:
            raise ValueError(f"{what}: {size} bytes, the header needs {expected}; re-export or remove the file.")
        return
    with open(p, "rb") as f:
        f.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", f.read(4))[0]
    if isize == expected % 2**32:
        return
    total = 0
    try:
        with gzip.open(p, "rb") as g:
            while chunk := g.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        raise ValueError(f"{what} or damaged ({type(e).__name__}: {e}); re-export or remove the file.") from e
    if total < expected:
        raise ValueError(f"{what}: {total} bytes uncompressed, the header needs {expected}; re-export or remove it.")


def _check_detached_data(p: Path) -> None:
    """A ``.mhd``/``.nhdr`` header names its data file: say plainly when that file is missing."""
    import re

    key = {".mhd": "ElementDataFile", ".nhdr": "data file"}.get(p.suffix.lower())
    if key is None:
        return
    with open(p, encoding="latin-1", errors="replace") as f:
        text = f.read(1 << 16)
    m = re.search(rf"^\s*{key}\s*[=:]\s*(.+?)\s*$", text, flags=re.MULTILINE | re.IGNORECASE)
    if not m or m.group(1).upper() in ("LOCAL", "LIST") or m.group(1).startswith(("LIST", "%")):
        return
    data = p.parent / m.group(1)
    if not data.exists():
        raise FileNotFoundError(f"image file {p}: its data file {data.name} is missing; copy it beside the header.")


class _DeferredError:
    """A read error held until ``get_data`` (see :meth:`SITKReader.read`)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class SITKReader(ImageReader):
    """Load images with SimpleITK for MONAI's ``LoadImage``.

    Args:
        channel_dim: the channel dimension of the loaded array if the image has one; ``None``
            means multi-component images put their components last (``-1``) and scalar images have
            no channel (``"no_channel"``).
        series_uid: pick this SeriesInstanceUID in a folder with several DICOM series.
        affine_lps_to_ras: convert SimpleITK's LPS geometry to RAS (MONAI's convention). Default ``True``.
        reverse_indexing: return arrays in (x, y, z) order like MONAI's other readers. Default ``True``.
        pixel_type: optional SimpleITK pixel type to cast to while reading.
    """

    def __init__(
        self,
        channel_dim: int | None = None,
        series_uid: str | None = None,
        affine_lps_to_ras: bool = True,
        reverse_indexing: bool = True,
        pixel_type=None,
        **kwargs,
    ) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.series_uid = series_uid
        self.affine_lps_to_ras = affine_lps_to_ras
        self.reverse_indexing = reverse_indexing
        self.pixel_type = pixel_type
        self.kwargs = kwargs

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        """Files with a SimpleITK-readable suffix, and folders (DICOM series)."""
        for f in ensure_tuple(filename):
            p = Path(f)
            name = p.name.lower()
            if not (p.is_dir() or name.endswith(SUPPORTED_SUFFIXES)):
                return False
        return True

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs):
        """Read one or several images (several are stacked as channels by ``get_data``).

        A read error is returned as a :class:`_DeferredError` and raised by :meth:`get_data`: ``LoadImage``
        swallows exceptions from ``read()`` and silently tries MONAI's other readers (which would, e.g.,
        stack two DICOM series of one folder into one volume), but it does not catch ``get_data()``.
        """
        series_uid = kwargs.pop("series_uid", self.series_uid)
        imgs = []
        for f in ensure_tuple(data):
            try:
                imgs.append(read_sitk_image(f, series_uid=series_uid, pixel_type=self.pixel_type))
            except (OSError, ValueError, RuntimeError) as e:
                imgs.append(_DeferredError(e))
        return imgs if len(imgs) > 1 else imgs[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Return ``(array, meta)``: array in (x, y, z[, c]) order, meta with RAS ``affine``."""
        for i in img if isinstance(img, (list, tuple)) else [img]:
            if isinstance(i, _DeferredError):
                raise i.error
        arrays: list[np.ndarray] = []
        compatible: dict = {}
        for i in img if isinstance(img, (list, tuple)) else [img]:  # a sitk.Image is itself iterable
            data = self._get_array_data(i)
            header = self._get_meta_dict(i)
            spatial_shape = np.asarray(i.GetSize())
            header[MetaKeys.ORIGINAL_AFFINE] = self._get_affine(i)
            header[MetaKeys.AFFINE] = header[MetaKeys.ORIGINAL_AFFINE].copy()
            header[MetaKeys.SPACE] = SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS
            header[MetaKeys.SPATIAL_SHAPE] = spatial_shape
            if self.channel_dim is None:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan") if i.GetNumberOfComponentsPerPixel() == 1 else -1
            else:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = self.channel_dim
            arrays.append(data)
            _copy_compatible_dict(header, compatible)
        return _stack_images(arrays, compatible), compatible

    def _get_meta_dict(self, img) -> dict:
        meta = {}
        for key in img.GetMetaDataKeys():
            if key.startswith("ITK_"):
                continue
            try:
                meta[key] = img.GetMetaData(key)
            except RuntimeError:  # non-string entries
                continue
        meta["spacing"] = np.asarray(img.GetSpacing())
        return meta

    def _get_affine(self, img) -> np.ndarray:
        nd = img.GetDimension()
        sr = min(nd, 3)
        direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(nd, nd)[:sr, :sr]
        spacing = np.asarray(img.GetSpacing(), dtype=np.float64)[:sr]
        origin = np.asarray(img.GetOrigin(), dtype=np.float64)[:sr]
        affine = np.eye(sr + 1)
        affine[:sr, :sr] = direction @ np.diag(spacing)
        affine[:sr, -1] = origin
        if self.affine_lps_to_ras:
            affine = orientation_ras_lps(affine)  # LPS <-> RAS: flip the first two world axes
        return affine

    def _get_array_data(self, img) -> np.ndarray:
        import SimpleITK as sitk

        arr = sitk.GetArrayFromImage(img)  # (z, y, x[, c])
        if not self.reverse_indexing:
            return arr
        nd = img.GetDimension()
        if img.GetNumberOfComponentsPerPixel() == 1:
            return np.ascontiguousarray(arr.transpose(tuple(range(nd - 1, -1, -1))))
        return np.ascontiguousarray(arr.transpose(tuple(range(nd - 1, -1, -1)) + (nd,)))
