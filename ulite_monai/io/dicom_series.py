# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""DICOM series discovery and series-to-volume conversion.

Discovery reads headers only (``pydicom.dcmread(..., stop_before_pixels=True)``) and groups
instances by study and series. Volume building decodes pixel data (compressed transfer
syntaxes through pydicom's pixel-data plugins), sorts planes along the slice normal computed
from ImageOrientationPatient (never by InstanceNumber or file name), derives the slice
spacing from ImagePositionPatient, applies the modality rescale and checks the geometry.

Geometry policy (each rule gives the reason in the error or in ``SeriesVolume.notes``):

* planes with different ImageOrientationPatient, Rows/Columns or PixelSpacing in one series:
  rejected (``mixed orientations``); export the sub-series separately.
* several planes at the same position (multi-echo, multi-phase, repeated acquisitions):
  rejected; identical copies of one SOP instance are de-duplicated silently.
* positions off the slice normal: scanners round ImagePositionPatient (often to 0.1 mm), so planes may sit
  a little off the ideal stack. A line is fitted through the positions; scatter and drift within
  ``position_tolerance`` x the smallest pixel spacing (default 0.2 voxel) are tolerated and noted (the grid
  is the fitted one); a systematic drift beyond it (gantry tilt, sheared stack) or a larger scatter is
  rejected with the measured drift and tilt angle.
* MONOCHROME1: pixel values are used as stored, with the modality rescale (the photometric
  interpretation only inverts the display), so a MONOCHROME1 series gives the same HU as its
  MONOCHROME2 twin.
* a damaged instance (header cut short or pixel data unreadable) fails its series, naming the file:
  the series is not segmented with a gap or an interpolated plane. A file whose header lost its UIDs
  is tied to the series whose files share its folder.
* uneven slice gaps (a missing slice, variable-thickness protocols): resampled with linear
  interpolation onto a regular grid with the smallest gap, when the largest gap is at most
  ``max_gap_ratio`` times the smallest; rejected otherwise. The segmentation is mapped back
  to the source planes by nearest slice so that the DICOM SEG still matches every source plane.

Coordinates: DICOM patient coordinates are LPS; ``SeriesVolume.affine_lps`` maps voxel index
``(column, row, slice)`` to LPS millimetres. The conversion to RAS happens in
:func:`SeriesVolume.affine_ras` (and inside SimpleITK/MONAI readers for files).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

__all__ = [
    "IMAGE_SOP_CLASSES",
    "IMAGE_2D_SOP_CLASSES",
    "ImageInstance",
    "VOLUME_FILE_SUFFIXES",
    "DicomFrame",
    "DicomSeries",
    "SkippedInput",
    "DiscoveryResult",
    "SeriesRejectedError",
    "SeriesVolume",
    "discover_inputs",
    "load_series_volume",
    "sanitize_name",
]

logger = logging.getLogger(__name__)

# Cross-sectional image storage classes the batch turns into volumes.
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET Image Storage",
}
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

# Single-frame 2D image storage classes a 2D bundle segments image by image (``discover_inputs(images_2d=True)``).
IMAGE_2D_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.1": "VL Endoscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.2": "VL Microscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.4.1": "Video Photographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.3": "Digital Intra-Oral X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.12.1": "X-Ray Angiographic Image Storage",
}
IMAGE_2D_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# Files the batch reads as whole volumes (through the bundle's LoadImaged reader).
VOLUME_FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

_POS_TOL_MM = 1e-3  # positions closer than this are "the same position"
POSITION_TOLERANCE = 0.2  # default: tolerated position scatter/drift, as a fraction of the smallest pixel spacing
OUTPUT_MARKER = ".ulite-dicom.lock"  # a folder holding this file is a batch output folder, never an input
_ORIENT_TOL = 1e-3  # direction cosines closer than this are "the same orientation"


class SeriesRejectedError(ValueError):
    """A series (or one of its files) cannot be turned into a volume; the message says why and what to do."""


def sanitize_name(text: str, max_len: int = 120) -> str:
    """File-name-safe form of a UID or name: keeps ``[A-Za-z0-9._-]``, replaces the rest by ``_``."""
    safe = "".join(c if (c.isascii() and (c.isalnum() or c in "._-")) else "_" for c in str(text)).strip("._")
    return (safe or "unnamed")[:max_len]


@dataclass
class DicomFrame:
    """One image plane: a single-frame instance or one frame of a multi-frame instance."""

    path: str
    sop_instance_uid: str
    frame_index: int | None  # 0-based frame number in a multi-frame instance, None for single-frame
    position: np.ndarray  # ImagePositionPatient (LPS, mm)
    orientation: np.ndarray  # ImageOrientationPatient (6 direction cosines)
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) as in PixelSpacing
    slope: float = 1.0
    intercept: float = 0.0


@dataclass
class DicomSeries:
    """Header-level view of one image series (no pixel data read yet)."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    header: Dataset  # header of the first instance, used by selection rules and the SEG
    files: list[str] = field(default_factory=list)
    frames: list[DicomFrame] = field(default_factory=list)
    sop_instance_uids: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # header problems that make the series unusable

    @property
    def modality(self) -> str:
        return str(self.header.get("Modality", ""))

    @property
    def num_slices(self) -> int:
        return len(self.frames)

    @property
    def key(self) -> str:
        """Manifest key: study and series UID (one series UID can occur in two studies)."""
        return f"dicom:{self.study_uid}/{self.series_uid}"

    @property
    def legacy_key(self) -> str:
        """The key of manifests written before keys carried the study UID."""
        return f"dicom:{self.series_uid}"

    @property
    def description(self) -> str:
        return str(self.header.get("SeriesDescription", ""))


@dataclass
class SkippedInput:
    """A file or series that discovery set aside, with the reason."""

    path: str
    reason: str
    study_uid: str = ""
    series_uid: str = ""

    @property
    def key(self) -> str:
        return f"dicom:{self.study_uid}/{self.series_uid}:skipped" if self.series_uid else f"file:{self.path}"


@dataclass
class ImageInstance:
    """A single-frame 2D DICOM image (what a 2D bundle segments), header only."""

    path: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str = ""
    description: str = ""

    @property
    def key(self) -> str:
        return f"dicom:{self.study_uid}/{self.series_uid}/{self.sop_instance_uid}"


@dataclass
class DiscoveryResult:
    series: list[DicomSeries]
    volume_files: list[str]
    skipped: list[SkippedInput]
    images: list[ImageInstance] = field(default_factory=list)  # 2D DICOM images (``images_2d=True``)
    image_files: list[str] = field(default_factory=list)  # PNG/JPEG/TIFF/BMP files (``images_2d=True``)


def _float_list(value: Any) -> list[float]:
    return [float(v) for v in value]


def _frames_from_header(ds: Dataset, path: str) -> list[DicomFrame]:
    """Planes described by a header: single-frame (IPP/IOP at top level) or enhanced multi-frame
    (per-frame / shared functional groups)."""
    sop_uid = str(ds.SOPInstanceUID)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if n_frames > 1:
            raise SeriesRejectedError(
                f"{path}: multi-frame instance ({n_frames} frames) without per-frame functional groups; "
                "only enhanced multi-frame CT/MR/PET or single-frame series are supported"
            )
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if kw not in ds or ds[kw].value is None or len(ds[kw].value) == 0:
                raise SeriesRejectedError(f"damaged instance {path}: missing {kw} (header cut short or incomplete); "
                                          "the plane cannot be placed in patient space")
        return [
            DicomFrame(
                path=path,
                sop_instance_uid=sop_uid,
                frame_index=None,
                position=np.asarray(_float_list(ds.ImagePositionPatient), dtype=np.float64),
                orientation=np.asarray(_float_list(ds.ImageOrientationPatient), dtype=np.float64),
                pixel_spacing=tuple(_float_list(ds.PixelSpacing)[:2]),
                slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
                intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
            )
        ]
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])
    shared = shared[0] if len(shared) else Dataset()
    frames = []
    for i, per in enumerate(ds.PerFrameFunctionalGroupsSequence):

        def _item(seq_kw: str, per=per) -> Dataset | None:
            for group in (per, shared):
                if seq_kw in group and len(group[seq_kw].value):
                    return group[seq_kw].value[0]
            return None

        pos, ori, meas = (
            _item("PlanePositionSequence"),
            _item("PlaneOrientationSequence"),
            _item("PixelMeasuresSequence"),
        )
        if pos is None or ori is None or meas is None or "PixelSpacing" not in meas:
            raise SeriesRejectedError(f"{path}: frame {i + 1} lacks plane position/orientation/pixel spacing")
        rescale = _item("PixelValueTransformationSequence")
        slope = float(rescale.get("RescaleSlope", 1.0)) if rescale is not None else float(ds.get("RescaleSlope", 1.0))
        intercept = (
            float(rescale.get("RescaleIntercept", 0.0))
            if rescale is not None
            else float(ds.get("RescaleIntercept", 0.0))
        )
        frames.append(
            DicomFrame(
                path=path,
                sop_instance_uid=sop_uid,
                frame_index=i,
                position=np.asarray(_float_list(pos.ImagePositionPatient), dtype=np.float64),
                orientation=np.asarray(_float_list(ori.ImageOrientationPatient), dtype=np.float64),
                pixel_spacing=tuple(_float_list(meas.PixelSpacing)[:2]),
                slope=slope,
                intercept=intercept,
            )
        )
    if len(frames) != n_frames:
        raise SeriesRejectedError(f"{path}: NumberOfFrames={n_frames} but {len(frames)} per-frame groups")
    return frames


def _read_header(path: str) -> Dataset:
    """Header only; files without the 128-byte preamble are accepted when they parse as DICOM with UIDs."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            ok = "SOPClassUID" in ds and "SOPInstanceUID" in ds and str(ds.SOPClassUID).startswith("1.2.")
        except Exception:
            ok = False
        if not ok:
            raise
        return ds


def _is_volume_file(name: str) -> bool:
    low = name.lower()
    return any(low.endswith(s) for s in VOLUME_FILE_SUFFIXES)


def _walk(root: Path, exclude: set[Path], follow_symlinks: bool) -> tuple[list[Path], list[SkippedInput]]:
    """Files under ``root`` (sorted), leaving out batch output folders (``exclude`` or holding the marker)."""
    paths: list[Path] = []
    pruned: list[SkippedInput] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        here = Path(dirpath)
        if here.resolve() in exclude or OUTPUT_MARKER in filenames:
            pruned.append(SkippedInput(dirpath, "output folder of a ulite-dicom run (not read as input)"))
            dirnames[:] = []
            continue
        dirnames.sort()
        paths.extend(here / f for f in sorted(filenames))
    return paths, pruned


def discover_inputs(
    root: str | os.PathLike, follow_symlinks: bool = False, exclude: list[str | os.PathLike] | None = None,
    images_2d: bool = False,
) -> DiscoveryResult:
    """Walk ``root``; read DICOM headers only, group image instances by study and series.

    NIfTI/NRRD/MHA files are returned as ``volume_files``. Everything else is reported in
    ``skipped`` with a reason (not DICOM, unreadable header, DICOMDIR, non-image SOP class such as
    SR, PR, KO, SEG, RTSTRUCT, ...). Non-image objects are reported once per series. Image files whose
    header is cut short (no study/series UID left) make the series in their folder fail, naming them.

    Args:
        root: a folder (walked recursively) or a single file.
        follow_symlinks: follow symbolic links to folders while walking.
        exclude: folders not to walk (the batch's own output folder); folders holding a batch's lock file
            are left out too, so that results are never segmented again.
        images_2d: also collect 2D images for a 2D model: single-frame DICOM images of the classes in
            :data:`IMAGE_2D_SOP_CLASSES` (``images``; multi-frame ones are skipped with the reason) and
            PNG/JPEG/TIFF/BMP files (``image_files``). Without it they are skipped as before.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"input {root} does not exist")
    skipped: list[SkippedInput] = []
    paths = [root] if root.is_file() else []
    if root.is_dir():
        paths, skipped = _walk(root, {Path(p).resolve() for p in exclude or ()}, follow_symlinks)
    series: dict[tuple[str, str], DicomSeries] = {}
    non_image: dict[tuple[str, str, str], SkippedInput] = {}
    damaged: list[SkippedInput] = []  # image files without UIDs: tied to the series of their folder
    volumes: list[str] = []
    images: list[ImageInstance] = []
    image_files: list[str] = []
    for p in paths:
        sp = str(p)
        if _is_volume_file(p.name):
            volumes.append(sp)
            continue
        if images_2d and p.name.lower().endswith(IMAGE_2D_FILE_SUFFIXES):
            image_files.append(sp)
            continue
        try:
            ds = _read_header(sp)
        except InvalidDicomError:
            skipped.append(SkippedInput(sp, "not a DICOM file"))
            continue
        except Exception as e:  # truncated header, bad VR, unreadable file
            damaged.append(SkippedInput(sp, f"unreadable DICOM header ({type(e).__name__}: {e})"))
            continue
        if images_2d and str(ds.get("SOPClassUID", "")) in IMAGE_2D_SOP_CLASSES:
            _add_2d_image(ds, sp, images, skipped)
            continue
        add_instance(ds, sp, series, non_image, damaged, skipped)
    for d in damaged:  # one rule: a damaged instance fails the series it belongs to
        folder = os.path.dirname(d.path)
        owners = [s for s in series.values() if any(os.path.dirname(f) == folder for f in s.files)]
        if owners:
            for s in owners:
                s.problems.append(f"damaged instance {d.path}: {d.reason}; re-export the series")
        else:
            skipped.append(SkippedInput(d.path, f"{d.reason}; re-export the file"))
    # A series whose image instances all fell out still shows up so the manifest can say why.
    return DiscoveryResult(list(series.values()), volumes, skipped + list(non_image.values()), images, image_files)


def _add_2d_image(ds: Dataset, path: str, images: list, skipped: list) -> None:
    """Take a single-frame 2D DICOM image; set aside multi-frame ones and files without UIDs, with the reason."""
    study_uid, series_uid = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
    if not study_uid or not series_uid or "SOPInstanceUID" not in ds:
        skipped.append(SkippedInput(path, "DICOM header without Study/Series/SOP Instance UID (truncated or "
                                          "incomplete file); re-export the file"))
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        skipped.append(SkippedInput(path, f"{frames}-frame {IMAGE_2D_SOP_CLASSES[str(ds.SOPClassUID)]}: a 2D model "
                                          "takes single-frame images", study_uid, series_uid))
        return
    images.append(ImageInstance(path, study_uid, series_uid, str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                str(ds.get("Modality", "")), str(ds.get("SeriesDescription", ""))))


def add_instance(ds: Dataset, path: str, series: dict, non_image: dict, damaged: list, skipped: list) -> None:
    """Sort one instance header into ``series`` (by study and series UID) or one of the lists of set-asides."""
    meta = ds.get("file_meta", Dataset())
    sop_class = str(ds.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", ""))
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        skipped.append(SkippedInput(path, "DICOMDIR index file (the tree is walked instead)"))
        return
    study_uid = str(ds.get("StudyInstanceUID", ""))
    series_uid = str(ds.get("SeriesInstanceUID", ""))
    if not study_uid or not series_uid or "SOPInstanceUID" not in ds:
        why = "DICOM header without Study/Series/SOP Instance UID (truncated or incomplete file)"
        (damaged if sop_class in IMAGE_SOP_CLASSES else skipped).append(SkippedInput(path, why))
        return
    if sop_class not in IMAGE_SOP_CLASSES:
        name = UID(sop_class).name if sop_class else "no SOPClassUID"
        key = (study_uid, series_uid, sop_class)
        if key not in non_image:
            non_image[key] = SkippedInput(
                path, f"{name} ({ds.get('Modality', '?')}) is not a cross-sectional image; not segmented",
                study_uid, series_uid)
        return
    s = series.get((study_uid, series_uid))
    if s is None:
        s = series[(study_uid, series_uid)] = DicomSeries(study_uid, series_uid, sop_class, ds)
    sop_uid = str(ds.SOPInstanceUID)
    if sop_uid in s.sop_instance_uids:
        s.notes.append(f"duplicate copy of SOP instance {sop_uid} ignored: {path}")
        return
    try:
        frames = _frames_from_header(ds, path)
    except SeriesRejectedError as e:
        s.problems.append(str(e))
        s.files.append(path)
        return
    except Exception as e:
        s.problems.append(f"{path}: unusable geometry attributes ({type(e).__name__}: {e})")
        s.files.append(path)
        return
    s.sop_instance_uids.add(sop_uid)
    s.files.append(path)
    s.frames.extend(frames)


@dataclass
class SeriesVolume:
    """A series as a regular 3-D grid.

    ``array`` is indexed ``[slice, row, column]``; ``affine_lps`` maps ``(column, row, slice, 1)`` to
    LPS millimetres. ``frames`` are the source planes sorted along the slice normal and
    ``frame_to_slice[i]`` is the array slice that represents ``frames[i]``.
    """

    array: np.ndarray
    origin: np.ndarray
    spacing: tuple[float, float, float]  # (column, row, slice) spacing, mm
    direction: np.ndarray  # 3x3, columns: row direction, column direction, slice normal
    frames: list[DicomFrame]
    frame_to_slice: np.ndarray
    datasets: dict[str, Dataset]  # SOPInstanceUID -> header (pixel data removed)
    notes: list[str] = field(default_factory=list)
    geometry: str = "regular"  # "regular", "regular, rounded positions tolerated", "resampled: ..."

    @property
    def affine_lps(self) -> np.ndarray:
        a = np.eye(4)
        a[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        a[:3, 3] = self.origin
        return a

    @property
    def affine_ras(self) -> np.ndarray:
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps

    @property
    def resampled(self) -> bool:
        return len(self.frame_to_slice) != self.array.shape[0] or not np.array_equal(
            self.frame_to_slice, np.arange(len(self.frames))
        )

    def to_sitk(self):
        """SimpleITK image in the series geometry (SimpleITK is LPS, like DICOM)."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(self.array)
        img.SetOrigin(tuple(float(v) for v in self.origin))
        img.SetSpacing(tuple(float(v) for v in self.spacing))
        img.SetDirection(tuple(float(v) for v in self.direction.flatten()))
        return img


def _orthonormal_direction(iop: np.ndarray) -> np.ndarray:
    row = iop[:3] / np.linalg.norm(iop[:3])
    col = iop[3:] - np.dot(iop[3:], row) * row
    col = col / np.linalg.norm(col)
    return np.stack([row, col, np.cross(row, col)], axis=1)


@dataclass
class _Geometry:
    frames: list[DicomFrame]  # sorted along the normal
    offsets: np.ndarray  # plane offsets along the normal (mm)
    grid: np.ndarray | None  # slice offsets of a resampled grid; None: one slice per plane
    origin: np.ndarray
    dz: float
    geometry: str  # what was done, for the manifest
    notes: list[str]


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``y ~ a + x b`` (y may be (n, d)); returns (fitted values, slope b)."""
    a = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return a @ coef, coef[1]


def _plan_geometry(
    series: DicomSeries, max_gap_ratio: float, position_tolerance: float = POSITION_TOLERANCE
) -> _Geometry:
    """Sort planes along the normal and check them against the module's policy."""
    name = f"series {series.series_uid}"
    frames = series.frames
    if series.problems:
        raise SeriesRejectedError(f"{name}: " + "; ".join(series.problems[:3]))
    if len(frames) < 2:
        raise SeriesRejectedError(f"{name}: {len(frames)} image plane(s); a volume needs at least 2")
    iop0 = frames[0].orientation
    if any(np.max(np.abs(f.orientation - iop0)) > _ORIENT_TOL for f in frames):
        n_groups = len({tuple(np.round(f.orientation, 3)) for f in frames})
        raise SeriesRejectedError(
            f"{name}: mixed orientations ({n_groups} different ImageOrientationPatient values, e.g. localizer "
            "images inside the series); export each orientation as its own series"
        )
    ps0 = frames[0].pixel_spacing
    if any(max(abs(a - b) for a, b in zip(f.pixel_spacing, ps0)) > 1e-4 for f in frames):
        raise SeriesRejectedError(f"{name}: PixelSpacing differs between planes; not a single volume")
    direction = _orthonormal_direction(iop0)
    normal = direction[:, 2]
    offsets = np.array([float(np.dot(f.position, normal)) for f in frames])
    order = np.argsort(offsets, kind="stable")
    frames = [frames[i] for i in order]
    offsets = offsets[order]
    tol = max(position_tolerance * min(ps0), _POS_TOL_MM)
    gaps = np.diff(offsets)
    if np.any(gaps < max(_POS_TOL_MM, min(tol, 0.5 * float(np.median(gaps))))):
        n_dup = int(np.sum(gaps < max(_POS_TOL_MM, min(tol, 0.5 * float(np.median(gaps))))))
        raise SeriesRejectedError(
            f"{name}: {n_dup} plane(s) share a position with another plane (multi-echo, multi-phase or repeated "
            "acquisition in one series); split the series, e.g. by EchoNumbers/TemporalPositionIdentifier"
        )
    # Sideways position components: a line through them (tilt/shear) plus scatter (rounding).
    pos = np.stack([f.position for f in frames])
    lateral = pos - np.outer(pos @ normal, normal)
    fitted, shear = _line_fit(offsets, lateral)
    scatter = float(np.max(np.linalg.norm(lateral - fitted, axis=1)))
    drift = float(np.linalg.norm(shear) * (offsets[-1] - offsets[0]))
    off_normal = float(np.max(np.linalg.norm(lateral - lateral.mean(axis=0), axis=1)))
    if drift > tol:
        angle = float(np.degrees(np.arctan(np.linalg.norm(shear))))
        raise SeriesRejectedError(
            f"{name}: tilted or sheared stack: plane positions drift {drift:.3f} mm sideways of the slice normal "
            f"over the series (tilt {angle:.2f} deg, e.g. gantry tilt; tolerance {tol:.3f} mm = "
            f"{position_tolerance:g} x pixel spacing); resample the series to an orthogonal grid before export"
        )
    if scatter > tol:
        raise SeriesRejectedError(
            f"{name}: plane positions scatter up to {scatter:.3f} mm sideways of the slice normal (more than "
            f"rounding, tolerance {tol:.3f} mm); not one stack of planes: check the export"
        )
    notes, geometry = [], "regular"
    k = np.arange(len(frames), dtype=np.float64)
    along_fit, dz = _line_fit(k, offsets)
    along_dev = float(np.max(np.abs(offsets - along_fit)))
    if along_dev <= tol:  # regular (maybe rounded) stack: one slice per plane on the fitted grid
        grid, dz = None, float(dz)
        origin = (pos - np.outer(k * dz, normal)).mean(axis=0)
        if max(off_normal, along_dev) > 1e-3:
            geometry = "regular, rounded positions tolerated"
            notes.append(
                f"plane positions within {max(off_normal, along_dev):.3f} mm of a regular stack (rounded by the "
                f"scanner; tolerated up to {tol:.3f} mm); fitted slice spacing {dz:.4f} mm"
            )
        return _Geometry(frames, offsets, grid, origin, dz, geometry, notes)
    gmin, gmax = float(gaps.min()), float(gaps.max())
    if gmax / gmin > max_gap_ratio:
        raise SeriesRejectedError(
            f"{name}: slice gaps range from {gmin:.3f} to {gmax:.3f} mm (ratio {gmax / gmin:.1f} > {max_gap_ratio}); "
            "several stacks or many missing slices; check the export"
        )
    n = int(round((offsets[-1] - offsets[0]) / gmin)) + 1
    grid = offsets[0] + np.arange(n) * ((offsets[-1] - offsets[0]) / (n - 1))
    dz = float(grid[1] - grid[0])
    notes.append(
        f"uneven slice spacing ({gmin:.3f}-{gmax:.3f} mm); resampled to {n} slices at "
        f"{dz:.3f} mm, labels mapped back to the {len(frames)} source planes"
    )
    origin = frames[0].position + (grid[0] - offsets[0]) * normal
    return _Geometry(frames, offsets, grid, origin, dz, "resampled: uneven slice gaps", notes)


def _decode_frames(series: DicomSeries, frames: list[DicomFrame]) -> tuple[np.ndarray, dict[str, Dataset], set[str]]:
    """Pixel data of the sorted frames as float32 (modality rescale applied, MONOCHROME1 not inverted: the
    stored values mean the same as in MONOCHROME2), headers by SOP UID, and the photometric interpretations."""
    rows, cols = int(series.header.Rows), int(series.header.Columns)
    out = np.empty((len(frames), rows, cols), dtype=np.float32)
    by_path: dict[str, list[int]] = {}
    for i, f in enumerate(frames):
        by_path.setdefault(f.path, []).append(i)
    datasets: dict[str, Dataset] = {}
    photometrics: set[str] = set()
    for path, idxs in by_path.items():
        try:
            try:
                ds = pydicom.dcmread(path)
            except InvalidDicomError:  # no 128-byte preamble: discovery accepted it by its UIDs
                ds = pydicom.dcmread(path, force=True)
        except Exception as e:
            raise SeriesRejectedError(
                f"damaged instance {path}: cannot be read ({type(e).__name__}: {e}); re-export the file") from e
        if not any(kw in ds for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise SeriesRejectedError(f"{path}: no pixel data in the file; re-export the series with images")
        if int(ds.get("Rows", 0)) != rows or int(ds.get("Columns", 0)) != cols:
            raise SeriesRejectedError(
                f"{path}: {ds.get('Rows')}x{ds.get('Columns')} pixels, the series has {rows}x{cols}; mixed matrix sizes"
            )
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        if not photometric.startswith("MONOCHROME") or int(ds.get("SamplesPerPixel", 1)) != 1:
            raise SeriesRejectedError(f"{path}: {photometric} colour image; only grey-scale images are segmented")
        try:
            pix = ds.pixel_array
        except Exception as e:
            raise SeriesRejectedError(
                f"damaged instance {path}: pixel data cannot be decoded ({type(e).__name__}: {e}); the file may be "
                "truncated or use a "
                f"transfer syntax ({ds.file_meta.get('TransferSyntaxUID', '?')}) without an installed pydicom plugin"
            ) from e
        pix = np.asarray(pix)
        if pix.ndim == 2:
            pix = pix[None]
        for i in idxs:
            f = frames[i]
            plane = pix[f.frame_index or 0].astype(np.float32)
            if f.slope != 1.0 or f.intercept != 0.0:
                plane = plane * np.float32(f.slope) + np.float32(f.intercept)
            out[i] = plane
        for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if kw in ds:
                del ds[kw]
        datasets[str(ds.SOPInstanceUID)] = ds
        photometrics.add(photometric)
    return out, datasets, photometrics


def load_series_volume(
    series: DicomSeries, max_gap_ratio: float = 3.0, position_tolerance: float = POSITION_TOLERANCE
) -> SeriesVolume:
    """Decode a series into a regular volume with its patient geometry (see the module policy).

    Args:
        series: the series (from :func:`discover_inputs`).
        max_gap_ratio: largest/smallest slice gap still resampled onto a regular grid.
        position_tolerance: position scatter/drift tolerated, as a fraction of the smallest pixel spacing.

    Raises:
        SeriesRejectedError: with the series/file and the reason when the series cannot be a volume.
    """
    g = _plan_geometry(series, max_gap_ratio, position_tolerance)
    frames, offsets = g.frames, g.offsets
    planes, datasets, photometrics = _decode_frames(series, frames)
    direction = _orthonormal_direction(frames[0].orientation)
    notes = list(g.notes)
    if "MONOCHROME1" in photometrics:
        notes.append("MONOCHROME1: pixel values used as stored (rescaled); only the display is inverted")
    if g.grid is None:
        array = planes
        frame_to_slice = np.arange(len(frames))
    else:
        # linear interpolation along the normal between the bracketing source planes
        grid = g.grid
        hi = np.clip(np.searchsorted(offsets, grid, side="left"), 1, len(offsets) - 1)
        lo = hi - 1
        w = ((grid - offsets[lo]) / (offsets[hi] - offsets[lo])).astype(np.float32)
        array = planes[lo] * (1 - w)[:, None, None] + planes[hi] * w[:, None, None]
        frame_to_slice = np.clip(np.round((offsets - grid[0]) / g.dz).astype(int), 0, len(grid) - 1)
    # keep integer data compact (halves the temporary file for CT)
    if np.all(np.mod(array, 1) == 0) and array.min() >= -32768 and array.max() <= 32767:
        array = array.astype(np.int16)
    ps = frames[0].pixel_spacing
    return SeriesVolume(
        array=array,
        origin=np.asarray(g.origin, dtype=np.float64),
        spacing=(float(ps[1]), float(ps[0]), g.dz),
        direction=direction,
        frames=frames,
        frame_to_slice=frame_to_slice,
        datasets=datasets,
        notes=series.notes[:3] + notes,
        geometry=g.geometry,
    )
