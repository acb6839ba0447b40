#!/usr/bin/env python
# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Real scans -> DICOM series -> ulite-dicom batch -> geometry checked voxel for voxel.

For each scan in ``--data`` (the NRRD CT/MR scans with their masks, plus oblique and left-handed
re-orientations of two of them, and optionally the Colin27 head):

1. write it as a single-frame DICOM series (``ulite_monai.io.write_dicom_series``);
2. reader check: discover + ``load_series_volume`` and compare with the source image at every
   voxel in physical space (nearest-neighbour resampling with the identity transform);
3. SEG check with the real mask: put the mask on the series grid, write a DICOM SEG, read the
   frames back by referenced SOP instance and compare with the mask slice of that instance;
   frame positions vs ImagePositionPatient; ``dciodvfy`` errors;
4. batch check: run the batch (the bundle's inference pipeline) over all series; the NIfTI
   label must lie on the source grid (every source voxel centre at an integer index) and the
   SEG frames must equal the NIfTI label at every source plane.

Step 4 needs a prediction with foreground. Without ``--checkpoint`` the network from the bundle's
``network_def`` gets an output bias that predicts foreground wherever the bundle's preprocessing
keeps the image (its CropForegroundd box), a geometry probe, not a segmentation model; the
bundle's ``intensity_range`` is set to ``--probe-range`` (default 400..1400) so that box is a
part of the volume (bone in CT, bright tissue in MR) or nothing (status ``empty``).

Usage::

    .venv/bin/python scripts/real_dicom_batch_check.py --data ../shared/data/real --work /tmp/real_check
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the DICOM writers that make vendor-like series live with the tests

from support.dicom_write import sitk_to_dicom_series  # noqa: E402
from support.phantoms import foreground_probe_checkpoint  # noqa: E402
from ulite_monai.io.dicom_seg import segments_from_channel_def, write_dicom_seg  # noqa: E402
from ulite_monai.io.dicom_series import discover_inputs, load_series_volume  # noqa: E402

CASES = [  # name, image, label, modality, re-orientation
    ("lung1", "lung1_image.nrrd", "lung1_label.nrrd", "CT", None),
    ("lung2", "lung2_image.nrrd", "lung2_label.nrrd", "CT", None),
    ("brain1", "brain1_image.nrrd", "brain1_label.nrrd", "MR", None),  # left-handed as shipped
    ("brain2", "brain2_image.nrrd", "brain2_label.nrrd", "MR", None),
    ("breast1", "breast1_image.nrrd", "breast1_label.nrrd", "MR", None),
    ("breast1_oblique", "breast1_image.nrrd", "breast1_label.nrrd", "MR", "oblique"),
    ("lung1_lefthanded_oblique", "lung1_image.nrrd", "lung1_label.nrrd", "CT", "lefthanded_oblique"),
]


def _rotation(ax, ay, az):
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _reorient(img, how):
    if how is None:
        return img
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    if how == "oblique":
        d = _rotation(17, -23, 31) @ d
    elif how == "lefthanded_oblique":
        d = _rotation(-12, 9, 27) @ d @ np.diag([1, 1, -1])
    out = sitk.Image(img)
    out.SetDirection(tuple(d.flatten()))
    return out


def _same_grid_values(moving, reference, default):
    return sitk.GetArrayFromImage(sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkNearestNeighbor, default))


def _grid_offset(image, reference):
    """Largest distance (in voxels of ``image``) between reference voxel centres and ``image`` voxel centres."""
    size = reference.GetSize()
    worst = 0.0
    for corner in np.ndindex(2, 2, 2):
        idx = [int(c * (s - 1)) for c, s in zip(corner, size)]
        p = reference.TransformIndexToPhysicalPoint(idx)
        ci = np.asarray(image.TransformPhysicalPointToContinuousIndex(p))
        worst = max(worst, float(np.max(np.abs(ci - np.round(ci)))))
    return worst


def _dciodvfy(path):
    if shutil.which("dciodvfy") is None:
        return None
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return sum(1 for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error"))


def _seg_frames(path):
    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array
    arr = arr[None] if arr.ndim == 2 else arr
    frames = {}
    for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = np.array([float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])
        prev = frames.get(uid, (np.zeros(arr.shape[1:], np.uint8), pos))[0]
        frames[uid] = (np.maximum(prev, arr[i] > 0).astype(np.uint8), pos)
    return frames


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "real")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ulite_real_dicom_check"))
    ap.add_argument("--bundle", type=Path, default=REPO / "bundles" / "ulite")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--colin", action="store_true", help="also convert the Colin27 head (181 slices)")
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--probe-range", type=float, nargs=2, default=(400.0, 1400.0))
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"data folder {args.data} not found (see ../shared/data/real/README.md)", file=sys.stderr)
        return 2
    shutil.rmtree(args.work, ignore_errors=True)
    dicom_root = args.work / "dicom"
    cases = list(CASES)
    if args.colin:
        cases.append(("colin27", "colin27/ch2.nii.gz", "colin27/ch2bet.nii.gz", "MR", None))
    results, sources = {}, {}
    segments = segments_from_channel_def({"1": "lesion"})
    for name, image_file, label_file, modality, how in cases:
        t0 = time.perf_counter()
        image = _reorient(sitk.ReadImage(str(args.data / image_file)), how)
        label = sitk.Cast(_reorient(sitk.ReadImage(str(args.data / label_file)), how) > 0, sitk.sitkUInt8)
        if image.GetPixelID() not in (sitk.sitkInt16, sitk.sitkUInt8):
            image = sitk.Cast(image, sitk.sitkInt16)
        if image.GetPixelID() == sitk.sitkUInt8:
            image = sitk.Cast(image, sitk.sitkInt16)
        paths = sitk_to_dicom_series(image, dicom_root / name, modality=modality, series_description=name[:60])
        write_s = time.perf_counter() - t0
        det = float(np.linalg.det(np.asarray(image.GetDirection()).reshape(3, 3)))
        # 2. reader check
        t0 = time.perf_counter()
        found = discover_inputs(dicom_root / name)
        (series,) = found.series
        vol = load_series_volume(series)
        read_s = time.perf_counter() - t0
        src = sitk.GetArrayFromImage(image)
        back = _same_grid_values(vol.to_sitk(), image, -32768)
        reader_diff = int(np.abs(back.astype(np.int64) - src.astype(np.int64)).max())
        # 3. SEG with the real mask
        mask_on_vol = _same_grid_values(label, vol.to_sitk(), 0)
        t0 = time.perf_counter()
        seg_path = write_dicom_seg(
            mask_on_vol, vol, segments, args.work / "seg_truth" / f"{name}.seg.dcm", "ground truth", "1"
        )
        seg_s = time.perf_counter() - t0
        frames = _seg_frames(seg_path)
        lab = sitk.GetArrayFromImage(label)
        mism, pos_err, uids = 0, 0.0, []
        for k, p in enumerate(paths):
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            uid = str(ds.SOPInstanceUID)
            uids.append((uid, [float(v) for v in ds.ImagePositionPatient]))
            m = frames[uid][0] if uid in frames else np.zeros(lab.shape[1:], np.uint8)
            mism += int(np.sum(m != lab[k]))
            if uid in frames:
                pos_err = max(pos_err, float(np.abs(frames[uid][1] - uids[-1][1]).max()))
        sources[name] = (image, uids, series.series_uid)
        results[name] = {
            "size_xyz": list(image.GetSize()),
            "spacing": [round(s, 4) for s in image.GetSpacing()],
            "direction_det": round(det, 3),
            "slices": series.num_slices,
            "reader_max_abs_diff": reader_diff,
            "rebuilt_reversed": bool(
                np.dot(vol.direction[:, 2], np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]) < 0
            ),
            "truth_seg_voxels": int(lab.sum()),
            "truth_seg_mismatch_voxels": mism,
            "truth_seg_frame_pos_err_mm": round(pos_err, 6),
            "truth_seg_dciodvfy_errors": _dciodvfy(seg_path),
            "write_dicom_s": round(write_s, 2),
            "read_volume_s": round(read_s, 2),
            "write_seg_s": round(seg_s, 2),
        }
        print(name, json.dumps(results[name]), flush=True)
    if not args.skip_batch:
        from ulite_monai.batch.runner import BatchOptions, run_batch

        ckpt, overrides = args.checkpoint, {}
        if ckpt is None:
            ckpt = args.work / "foreground_probe.pt"
            foreground_probe_checkpoint(args.bundle, ckpt)
            overrides["intensity_range"] = list(args.probe_range)
        out = args.work / "out"
        summary = run_batch(
            BatchOptions(
                input_dir=dicom_root,
                output_dir=out,
                bundle_dir=args.bundle,
                rules=None,
                device=args.device,
                checkpoint=ckpt,
                progress=True,
                overrides=overrides,
            )
        )
        rows = {}
        for line in (out / "manifest.jsonl").read_text().splitlines():
            r = json.loads(line)
            rows[r.get("series_uid")] = r
        for name, (image, uids, series_uid) in sources.items():
            row = rows[series_uid]
            res = results[name]
            res["batch_status"] = row["status"]
            res["batch_timings_s"] = row.get("timings_s")
            if row["status"] not in ("done", "empty"):
                res["batch_reason"] = row.get("reason")
                continue
            nifti = sitk.ReadImage(str(out / row["outputs"]["nifti"]))
            res["nifti_grid_offset_voxels"] = round(_grid_offset(nifti, image), 6)
            res["nifti_same_size"] = sorted(nifti.GetSize()) == sorted(image.GetSize())
            on_src = _same_grid_values(nifti, image, 255)
            res["nifti_foreground_voxels"] = int((on_src == 1).sum())
            res["nifti_outside_voxels"] = int((on_src == 255).sum())
            if row["status"] == "done":
                frames = _seg_frames(out / row["outputs"]["seg"])
                mism, pos_err = 0, 0.0
                for k, (uid, ipp) in enumerate(uids):
                    m = frames[uid][0] if uid in frames else np.zeros(on_src.shape[1:], np.uint8)
                    mism += int(np.sum(m != on_src[k]))
                    if uid in frames:
                        pos_err = max(pos_err, float(np.abs(frames[uid][1] - ipp).max()))
                res["batch_seg_vs_nifti_mismatch_voxels"] = mism
                res["batch_seg_frame_pos_err_mm"] = round(pos_err, 6)
                res["batch_seg_dciodvfy_errors"] = _dciodvfy(out / row["outputs"]["seg"])
            print(
                name,
                "batch",
                json.dumps({k: v for k, v in res.items() if k.startswith(("batch", "nifti"))}),
                flush=True,
            )
        results["_batch_summary"] = summary
    (args.work / "report.json").write_text(json.dumps(results, indent=2, default=str))
    bad = [
        n
        for n, r in results.items()
        if not n.startswith("_")
        and (
            r["reader_max_abs_diff"]
            or r["truth_seg_mismatch_voxels"]
            or r["truth_seg_dciodvfy_errors"]
            or r.get("batch_seg_vs_nifti_mismatch_voxels")
            or r.get("batch_seg_dciodvfy_errors")
            or r.get("nifti_grid_offset_voxels", 0) > 1e-3
            or r.get("nifti_outside_voxels")
            or r.get("batch_status", "done") not in ("done", "empty")
        )
    ]
    print(f"report: {args.work / 'report.json'}; cases with problems: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
