#!/usr/bin/env python
# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Real scans written the way scanners and archives write them, then read back voxel for voxel.

For each real scan in ``--data`` (CT lungs, MR brain with a left-handed direction, MR breast) a plain
single-frame series is written, then turned into vendor-like variants, mostly by tools other than ours:

* ``rounded_oblique``: re-oriented obliquely, ImagePositionPatient written to 0.1 mm (as GE does);
* ``monochrome1``: PhotometricInterpretation set to MONOCHROME1 by dcmtk's ``dcmodify``;
* ``jpegls`` / ``jpeg_lossless`` / ``rle``: compressed by dcmtk's ``dcmcjpls``, ``dcmcjpeg`` (lossless SV1),
  ``dcmcrle``;
* ``enhanced``: one Legacy Converted Enhanced CT/MR multi-frame object made by highdicom.

Checks per variant: the reader's volume against the source image at every voxel in physical space
(nearest neighbour, identity transform); the real mask as SEG and as RTSTRUCT, read back onto the source
planes (SEG mismatching voxels, RTSTRUCT Dice); dciodvfy errors of both. Then series written by other
people: the multi-slice series of pydicom's test data (GE CT, Philips MR headers), our reader against
SimpleITK/GDCM's. Finally the batch over all variants with every output (probe weights as in
``real_dicom_batch_check.py``): status, NIfTI on the source grid, dciodvfy errors of SEG/RTSTRUCT/SR.

Usage::

    .venv/bin/python scripts/vendor_dicom_check.py --data ../shared/data/real --work /tmp/vendor_check
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
sys.path.insert(0, str(REPO / "tests"))

from support.dicom_write import sitk_to_dicom_series  # noqa: E402
from support.phantoms import foreground_probe_checkpoint  # noqa: E402
from ulite_monai.io.dicom_seg import build_dicom_seg, label_volume_to_source_frames, segments_from_channel_def  # noqa: E402
from ulite_monai.io.dicom_series import discover_inputs, load_series_volume  # noqa: E402
from ulite_monai.io.rtstruct import build_rtstruct, rtstruct_to_labels, source_plane_labels  # noqa: E402

CASES = [(n, f"{n}_image.nrrd", f"{n}_label.nrrd", m) for n, m in
         (("lung1", "CT"), ("brain1", "MR"), ("breast1", "MR"), ("lung2", "CT"))]
SEGMENTS = segments_from_channel_def({"1": "lesion"})


def _rotation(ax, ay, az):
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _oblique(img):
    out = sitk.Image(img)
    out.SetDirection(tuple((_rotation(17, -23, 31) @ np.asarray(img.GetDirection()).reshape(3, 3)).flatten()))
    return out


def _tool(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def make_variants(image, modality: str, folder: Path) -> dict[str, tuple[Path, object]]:
    """Variant name -> (series folder, the source image it must equal)."""
    base = folder / "plain"
    paths = sitk_to_dicom_series(image, base, modality=modality, series_description="plain")
    out = {"plain": (base, image)}
    obl = _oblique(image)
    rp = sitk_to_dicom_series(obl, folder / "rounded_oblique", modality=modality, series_description="rounded")
    for p in rp:
        ds = pydicom.dcmread(p)
        ds.ImagePositionPatient = [f"{float(v):.1f}" for v in ds.ImagePositionPatient]
        ds.save_as(p)
    out["rounded_oblique"] = (folder / "rounded_oblique", obl)
    for name, cmd in (("monochrome1", ["dcmodify", "-nb", "-m", "(0028,0004)=MONOCHROME1"]),
                      ("jpegls", ["dcmcjpls"]), ("jpeg_lossless", ["dcmcjpeg", "--encode-lossless-sv1"]),
                      ("rle", ["dcmcrle"])):
        dst = folder / name
        dst.mkdir(parents=True)
        uid = pydicom.uid.generate_uid()
        for p in paths:
            q = dst / p.name
            if name == "monochrome1":
                shutil.copy(p, q)
                _tool(cmd + [str(q)])
            else:
                _tool(cmd + [str(p), str(q)])
            ds = pydicom.dcmread(q)
            ds.SeriesInstanceUID = uid  # each variant is its own series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            ds.save_as(q)
        out[name] = (dst, image)
    import highdicom as hd

    cls = hd.legacy.LegacyConvertedEnhancedCTImage if modality == "CT" else hd.legacy.LegacyConvertedEnhancedMRImage
    mf = cls([pydicom.dcmread(p) for p in paths], series_instance_uid=pydicom.uid.generate_uid(), series_number=90,
             sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1)
    (folder / "enhanced").mkdir()
    mf.save_as(folder / "enhanced" / "multiframe.dcm")
    out["enhanced"] = (folder / "enhanced", image)
    return out


def _on_grid(moving, reference, default):
    return sitk.GetArrayFromImage(sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkNearestNeighbor, default))


def _dciodvfy(path) -> int | None:
    if shutil.which("dciodvfy") is None:
        return None
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return sum(1 for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error"))


def check_variant(folder: Path, source, label, work: Path) -> dict:
    (series,) = discover_inputs(folder).series
    vol = load_series_volume(series)
    src = sitk.GetArrayFromImage(source).astype(np.int64)
    back = _on_grid(vol.to_sitk(), source, -99999).astype(np.int64)
    res = {"slices": series.num_slices, "geometry": vol.geometry, "notes": vol.notes,
           "reader_max_abs_diff": int(np.abs(back - src).max())}
    mask = _on_grid(label, vol.to_sitk(), 0).astype(np.uint8)
    seg = build_dicom_seg(mask, vol, SEGMENTS, "ground truth", "1")
    seg_path = work / f"{folder.parent.name}_{folder.name}.seg.dcm"
    seg.save_as(seg_path)
    sources, frames = label_volume_to_source_frames(mask, vol)
    ds = pydicom.dcmread(seg_path)
    arr = ds.pixel_array.reshape((-1,) + mask.shape[1:])
    rebuilt = np.zeros_like(frames)
    for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0]
        if "ReferencedFrameNumber" in ref:
            k = int(ref.ReferencedFrameNumber) - 1
        else:
            k = [d.SOPInstanceUID for d in sources].index(ref.ReferencedSOPInstanceUID)
        rebuilt[k] |= arr[i]
    res["truth_seg_mismatch_voxels"] = int(np.sum(rebuilt != frames))
    res["truth_seg_dciodvfy_errors"] = _dciodvfy(seg_path)
    rt = build_rtstruct(mask, vol, SEGMENTS, "ground truth", "1")
    rt_path = work / f"{folder.parent.name}_{folder.name}.rtstruct.dcm"
    rt.save_as(rt_path, enforce_file_format=True)
    a, b = rtstruct_to_labels(pydicom.dcmread(rt_path), vol) > 0, source_plane_labels(mask, vol) > 0
    res["truth_rtstruct_dice"] = round(float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1)), 5)
    res["truth_rtstruct_dciodvfy_errors"] = _dciodvfy(rt_path)
    return res


def check_pydicom_series(work: Path) -> dict:
    """Series written by scanners (pydicom's test data): our reader against SimpleITK/GDCM's."""
    from pydicom.data import get_testdata_files

    groups: dict[str, list[str]] = {}
    for f in get_testdata_files("dicomdirtests/*/*/*"):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            continue
        if ds.get("Modality") in ("CT", "MR") and "ImagePositionPatient" in ds:
            groups.setdefault(str(ds.SeriesInstanceUID), []).append(f)
    out = {}
    for uid, files in groups.items():
        if len(files) < 3:
            continue
        folder = work / "pydicom" / uid[-12:]
        folder.mkdir(parents=True)
        for f in files:
            shutil.copy(f, folder / Path(f).name)
        try:
            (series,) = discover_inputs(folder).series
            vol = load_series_volume(series)
        except Exception as e:
            out[uid] = {"files": len(files), "ours": f"rejected: {e}"}
            continue
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        ref = reader.Execute()
        back = _on_grid(vol.to_sitk(), sitk.Cast(ref, sitk.sitkFloat32), -99999)
        diff = np.abs(back.astype(np.float64) - sitk.GetArrayFromImage(ref).astype(np.float64))
        out[uid] = {"files": len(files), "manufacturer": str(pydicom.dcmread(files[0], stop_before_pixels=True)
                                                                  .get("Manufacturer", "")),
                    "geometry": vol.geometry, "vs_gdcm_max_abs_diff": float(diff.max())}
    return out


def run_batch_over(root: Path, work: Path, bundle: Path, device: str) -> dict:
    from ulite_monai.batch.runner import BatchOptions, run_batch

    ckpt = work / "probe.pt"
    foreground_probe_checkpoint(bundle, ckpt)
    out = work / "out"
    summary = run_batch(BatchOptions(input_dir=root, output_dir=out, bundle_dir=bundle, rules=None, device=device,
                                     checkpoint=ckpt, progress=False, overrides={"intensity_range": [400, 1400]},
                                     formats=["seg", "nifti", "rtstruct", "sr", "qc"]))
    rows = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") != "dicom":
            continue
        name = "/".join(Path(r["input"]).parts[-2:])
        rows[name] = {"status": r["status"], "reason": r.get("reason", ""), "needs_review": r.get("needs_review"),
                      "geometry": r.get("geometry")}
        for kind in ("seg", "rtstruct", "sr"):
            if kind in (r.get("outputs") or {}):
                rows[name][f"{kind}_dciodvfy_errors"] = _dciodvfy(out / r["outputs"][kind])
    return {"rows": rows, "series_per_minute": summary["series_per_minute"], "counts": summary["counts"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "real")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ulite_vendor_check"))
    ap.add_argument("--bundle", type=Path, default=REPO / "bundles" / "ulite")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", nargs="*", default=[c[0] for c in CASES])
    ap.add_argument("--skip-batch", action="store_true")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"data folder {args.data} not found (see ../shared/data/real/README.md)", file=sys.stderr)
        return 2
    shutil.rmtree(args.work, ignore_errors=True)
    (args.work / "truth").mkdir(parents=True)
    report: dict = {"variants": {}}
    for name, image_file, label_file, modality in CASES:
        if name not in args.cases:
            continue
        image = sitk.Cast(sitk.ReadImage(str(args.data / image_file)), sitk.sitkInt16)
        label = sitk.Cast(sitk.ReadImage(str(args.data / label_file)) > 0, sitk.sitkUInt8)
        t = time.perf_counter()
        variants = make_variants(image, modality, args.work / "dicom" / name)
        for vname, (folder, source) in variants.items():
            lab = label if source is image else _oblique(label)
            res = check_variant(folder, source, lab, args.work / "truth")
            report["variants"][f"{name}/{vname}"] = res
            print(f"{name}/{vname}", json.dumps(res), flush=True)
        print(f"{name}: variants written and checked in {time.perf_counter() - t:.1f} s", flush=True)
    report["pydicom_series"] = check_pydicom_series(args.work)
    print("pydicom series", json.dumps(report["pydicom_series"]), flush=True)
    if not args.skip_batch:
        report["batch"] = run_batch_over(args.work / "dicom", args.work, args.bundle, args.device)
        print("batch", json.dumps(report["batch"]), flush=True)
    (args.work / "report.json").write_text(json.dumps(report, indent=2, default=str))
    bad = [k for k, r in report["variants"].items() if r["reader_max_abs_diff"] or r["truth_seg_mismatch_voxels"]
           or r["truth_seg_dciodvfy_errors"] or r["truth_rtstruct_dciodvfy_errors"] or r["truth_rtstruct_dice"] < 0.98]
    bad += [k for k, r in report["pydicom_series"].items() if r.get("vs_gdcm_max_abs_diff") not in (None, 0)]
    bad += [k for k, r in report.get("batch", {}).get("rows", {}).items() if r["status"] not in ("done", "empty")
            or any(v for kk, v in r.items() if kk.endswith("dciodvfy_errors"))]
    print(f"report: {args.work / 'report.json'}; cases with problems: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
