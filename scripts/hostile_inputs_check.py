#!/usr/bin/env python
# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""``ulite-dicom`` tried as a hostile new user would: generated bad inputs, each with the outcome it must get.

Every case is written under ``<work>/in/<case>/``; one batch runs over all of them (stand-in bundle from the
tests: a threshold "network", so results are known), then the cases about the output folder and reruns run
on their own. A case is *handled cleanly* when its manifest row has the expected status, the reason says what
the case is about (an expected phrase), names no Python object (``object at 0x``, "applying transform") and
the CLI exits with the expected code and no traceback. Prints one line per case and the counts.

Usage::

    .venv/bin/python scripts/hostile_inputs_check.py --work /tmp/hostile
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from support.dicom import make_standin_bundle, phantom, rotation  # noqa: E402
from support.dicom_write import write_dicom_series  # noqa: E402

CASES: dict[str, tuple] = {}  # name -> (status, phrase in the reason)


def case(status: str, phrase: str = ""):
    def register(fn):
        CASES[fn.__name__] = (status, phrase, fn)
        return fn
    return register


def _ct(folder, shape=(8, 16, 16), seed=0, **kw):
    return write_dicom_series(phantom(shape, seed=seed), folder, rescale=(1.0, -1024.0), **kw)


# ---- DICOM files and series -------------------------------------------------------------------------------------
@case("done")
def good_ct(d): _ct(d)
@case("done")
def monochrome1(d): _ct(d, extra={"PhotometricInterpretation": "MONOCHROME1"})
@case("failed", "a volume needs at least 2")
def one_plane(d): _ct(d, shape=(1, 16, 16))
@case("done")
def two_planes(d): _ct(d, shape=(2, 16, 16))
@case("failed", "no pixel data")
def missing_pixels(d):
    p = _ct(d)[3]
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p)
@case("failed", "damaged instance")
def pixels_cut(d):
    p = _ct(d)[2]
    p.write_bytes(p.read_bytes()[:-100])
@case("failed", "damaged instance")
def header_cut_mid_series(d):
    p = _ct(d)[4]
    p.write_bytes(p.read_bytes()[:300])
@case("failed", "damaged instance")
def header_cut_after_uids(d):
    p = _ct(d)[4]
    raw = p.read_bytes()
    p.write_bytes(raw[: raw.index(b"\x20\x00\x32\x00")])  # just before ImagePositionPatient
@case("done", "duplicate copy")
def duplicate_instance(d):
    p = _ct(d)[1]
    shutil.copy(p, d / "copy_of_slice.dcm")
@case("failed", "share a position")
def two_echoes(d):
    ps = _ct(d)
    ds = pydicom.dcmread(ps[1])
    ds.ImagePositionPatient = pydicom.dcmread(ps[2]).ImagePositionPatient
    ds.save_as(ps[1])
@case("failed", "mixed orientations")
def localizer_inside(d):
    ps = _ct(d)
    ds = pydicom.dcmread(ps[0])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(ps[0])
@case("failed", "PixelSpacing differs")
def mixed_spacing(d):
    ps = _ct(d)
    ds = pydicom.dcmread(ps[5])
    ds.PixelSpacing = [0.5, 0.5]
    ds.save_as(ps[5])
@case("failed", "mixed matrix sizes")
def mixed_matrix(d):
    ps = _ct(d)
    ds = pydicom.dcmread(ps[5])
    ds.Rows, ds.Columns = 8, 8
    ds.PixelData = np.zeros((8, 8), np.int16).tobytes()
    ds.save_as(ps[5])
@case("done", "resampled")
def one_missing_slice(d): _ct(d, shape=(10, 16, 16))[4].unlink()
@case("failed", "several stacks")
def many_missing_slices(d):
    for p in _ct(d, shape=(12, 16, 16))[2:9]:
        p.unlink()
@case("failed", "tilted or sheared")
def gantry_tilt(d):
    for k, p in enumerate(_ct(d)):
        ds = pydicom.dcmread(p)
        pos = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1] + 0.5 * k, pos[2]]
        ds.save_as(p)
@case("done", "rounded by the scanner")
def rounded_oblique(d):
    for p in _ct(d, spacing=(0.86, 0.86, 3.3), origin=(-10.03, 5.07, 3.31), direction=rotation(0, 18, 0)):
        ds = pydicom.dcmread(p)
        ds.ImagePositionPatient = [f"{float(v):.1f}" for v in ds.ImagePositionPatient]
        ds.save_as(p)
@case("done")
def left_handed_oblique(d): _ct(d, direction=rotation(20, -12, 33) @ np.diag([1, 1, -1]))
@case("done")
def scrambled_instance_numbers(d):
    for k, p in enumerate(_ct(d)):
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = (k * 7) % 5
        ds.save_as(p)
@case("failed", "colour image")
def rgb_series(d):
    for p in _ct(d):
        ds = pydicom.dcmread(p)
        ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = np.zeros((16, 16, 3), np.uint8).tobytes()
        ds.save_as(p)
@case("done")
def rle_compressed(d):
    from pydicom.uid import RLELossless

    for p in _ct(d):
        ds = pydicom.dcmread(p)
        ds.compress(RLELossless)
        ds.save_as(p)
@case("failed", "missing ImagePositionPatient")
def missing_position(d):
    p = _ct(d)[3]
    ds = pydicom.dcmread(p)
    del ds.ImagePositionPatient
    ds.save_as(p)
@case("failed", "missing PixelSpacing")
def missing_pixel_spacing(d):
    p = _ct(d)[3]
    ds = pydicom.dcmread(p)
    del ds.PixelSpacing
    ds.save_as(p)
@case("done")
def same_series_uid_study_a(d): _ct(d, study_uid="1.2.826.0.1.77.1", series_uid="1.2.826.0.1.77.9")
@case("done")
def same_series_uid_study_b(d): _ct(d, seed=3, study_uid="1.2.826.0.1.77.2", series_uid="1.2.826.0.1.77.9")
@case("done")
def uid_with_slash(d): _ct(d, study_uid="1.2.826.0.1.78", series_uid="1.2.3.4/5")
@case("done")
def uid_sanitising_alike(d): _ct(d, seed=4, study_uid="1.2.826.0.1.78", series_uid="1.2.3.4_5")
@case("done")
def no_preamble(d):
    for p in _ct(d):
        raw = p.read_bytes()
        p.write_bytes(raw[132:])  # drop preamble + DICM; the file meta stays
@case("done")
def mr_float_rescale(d):
    write_dicom_series(phantom((8, 16, 16)).astype(np.float64) * 0.37, d, modality="MR", rescale=(0.1, -300.0))
@case("done")
def enhanced_multiframe(d):
    import highdicom as hd

    tmp = d.parent / (d.name + "_src")
    ps = _ct(tmp)
    mf = hd.legacy.LegacyConvertedEnhancedCTImage([pydicom.dcmread(p) for p in ps], pydicom.uid.generate_uid(), 5,
                                                  pydicom.uid.generate_uid(), 1)
    d.mkdir(parents=True)
    mf.save_as(d / "mf.dcm")
    shutil.rmtree(tmp)


# ---- files that are not images to segment ------------------------------------------------------------------------
@case("skipped", "not a DICOM file")
def text_file(d):
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("exported by PACS")
@case("skipped", "not a DICOM file")
def empty_file(d):
    d.mkdir(parents=True)
    (d / "empty.dcm").write_bytes(b"")
@case("skipped", "not a DICOM file")
def random_bytes(d):
    d.mkdir(parents=True)
    (d / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(4000))
@case("skipped", "truncated or incomplete")
def lone_cut_header(d):
    p = _ct(d.parent / (d.name + "_src"), shape=(2, 8, 8))[0]
    d.mkdir(parents=True)
    (d / "cut.dcm").write_bytes(p.read_bytes()[:200])
    shutil.rmtree(p.parent)
@case("skipped", "not a cross-sectional image")
def sr_object(d):
    from pydicom.data import get_testdata_file

    d.mkdir(parents=True)
    shutil.copy(get_testdata_file("test-SR.dcm"), d / "sr.dcm")
@case("skipped", "DICOMDIR")
def dicomdir(d):
    from pydicom.data import get_testdata_file

    d.mkdir(parents=True)
    shutil.copy(get_testdata_file("DICOMDIR"), d / "DICOMDIR")


# ---- volume files ---------------------------------------------------------------------------------------------------
def _nii(path, arr, affine=None):
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))


@case("done")
def good_nifti(d):
    d.mkdir(parents=True)
    _nii(d / "v.nii.gz", phantom((12, 12, 12)))
@case("failed", "truncated")
def truncated_nii_gz(d):
    d.mkdir(parents=True)
    _nii(d / "v.nii.gz", phantom((20, 16, 16)))
    raw = (d / "v.nii.gz").read_bytes()
    (d / "v.nii.gz").write_bytes(raw[: len(raw) // 2])
@case("failed", "truncated")
def truncated_nii(d):
    d.mkdir(parents=True)
    _nii(d / "v.nii", phantom((20, 16, 16)))
    raw = (d / "v.nii").read_bytes()
    (d / "v.nii").write_bytes(raw[: len(raw) // 2])
@case("failed", "cannot read")
def junk_nii_gz(d):
    d.mkdir(parents=True)
    (d / "v.nii.gz").write_bytes(b"\x1f\x8b junk")
@case("failed", "")
def image_2d(d):
    d.mkdir(parents=True)
    _nii(d / "v.nii.gz", np.zeros((16, 16), np.int16))
@case("failed", "")
def image_5d(d):
    d.mkdir(parents=True)
    _nii(d / "v.nii.gz", np.zeros((8, 8, 8, 2, 2), np.int16))
@case("failed", "is missing")
def mhd_without_raw(d):
    d.mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(phantom((6, 8, 8))), str(d / "v.mhd"))
    (d / "v.raw").unlink()
@case("failed", "cannot read")
def truncated_nrrd(d):
    d.mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(phantom((20, 16, 16))), str(d / "v.nrrd"), useCompression=True)
    raw = (d / "v.nrrd").read_bytes()
    (d / "v.nrrd").write_bytes(raw[: len(raw) // 2])
@case("failed", "cannot read")
def empty_nrrd(d):
    d.mkdir(parents=True)
    (d / "v.nrrd").write_bytes(b"")
@case("done")
def dup_nii(d):
    d.mkdir(parents=True)
    _nii(d / "dup.nii.gz", phantom((10, 10, 10), seed=1))
@case("done")
def dup_nrrd(d):
    d.mkdir(parents=True)  # same stem as dup_nii once both are moved into one folder (see main)
    sitk.WriteImage(sitk.GetImageFromArray(phantom((9, 9, 9), seed=2)), str(d / "dup.nrrd"))
@case("done")
def space_name(d):
    d.mkdir(parents=True)
    _nii(d / "a b.nii.gz", phantom((10, 10, 10), seed=3))
@case("done")
def underscore_name(d):
    d.mkdir(parents=True)
    _nii(d / "a_b.nii.gz", phantom((10, 10, 10), seed=4))
@case("done")
def case_only_difference(d):
    d.mkdir(parents=True)
    _nii(d / "Case.nii.gz", phantom((10, 10, 10), seed=5))
    _nii(d / "case.nii.gz", phantom((10, 10, 10), seed=6))


def _run(args) -> tuple[int, str, str]:
    from ulite_monai.batch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = int(e.code or 0)
        except BaseException:  # a crash is a case not handled cleanly
            import traceback

            traceback.print_exc(file=err)
            rc = -1
    return rc, out.getvalue(), err.getvalue()


def _rows(out: Path) -> list[dict]:
    rows = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["key"]] = r
    return list(rows.values())


def _clean(reason: str) -> bool:
    return "object at 0x" not in reason and "applying transform" not in reason and "Traceback" not in reason


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ulite_hostile"))
    args = ap.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    inp, out = args.work / "in", args.work / "out"
    bundle = make_standin_bundle(args.work / "bundle")
    for name, (_, _, fn) in CASES.items():
        fn(inp / name)
    for name in ("dup_nrrd", "underscore_name"):  # collide with their partners in one folder
        partner = {"dup_nrrd": "dup_nii", "underscore_name": "space_name"}[name]
        for f in (inp / name).iterdir():
            f.rename(inp / partner / f.name)
        (inp / name).rmdir()
        (inp / name).symlink_to(partner)  # keeps the case's folder name for the report
    base = ["--bundle", bundle, "--random-weights", "--no-progress", "--rules", "all"]
    rc, stdout, err = _run([inp, out, *base])
    rows = _rows(out)
    results = {}
    for name, (status, phrase, _) in CASES.items():
        folder = str((inp / name).resolve())
        mine = [r for r in rows if str(Path(str(inp), r.get("input") or "")).startswith(folder)
                or (r.get("input") or "").startswith(folder)]
        if name in ("dup_nrrd", "underscore_name"):
            mine = [r for r in mine if r["input"].endswith((".nrrd", "a_b.nii.gz"))]
        elif name in ("dup_nii", "space_name"):
            mine = [r for r in mine if r["input"].endswith(("dup.nii.gz", "a b.nii.gz"))]
        ok = bool(mine) and all(r["status"] == status and phrase.lower() in (r.get("reason", "") + " ".join(
            r.get("notes") or [])).lower() and _clean(r.get("reason", "")) for r in mine)
        results[name] = (ok, [(r["status"], (r.get("reason") or "")[:150]) for r in mine])
    outputs = [p for r in rows for p in (r.get("outputs") or {}).values()]
    results["batch_exit_code_1_no_traceback"] = (rc == 1 and "Traceback" not in err, [rc])
    results["no_two_rows_share_an_output"] = (len(outputs) == len({p.casefold() for p in outputs}), [len(outputs)])
    # ---- the output folder and reruns -----------------------------------------------------------------------------
    (args.work / "a_file").write_text("x")
    for label, o in (("out_is_a_file", args.work / "a_file"), ("out_below_a_file", args.work / "a_file" / "o")):
        rc, _, err = _run([inp / "good_ct", o, *base])
        results[label] = (rc == 3 and len(err.strip().splitlines()) == 1, [rc, err.strip()[:150]])
    rc, _, err = _run([args.work / "nothing_here", args.work / "o2", *base])
    results["input_missing"] = (rc == 2 and "does not exist" in err, [rc, err.strip()[:150]])
    (args.work / "rules.json").write_text("[]")
    rc, _, err = _run([inp / "good_ct", args.work / "o3", *base[:-2], "--rules", args.work / "rules.json"])
    results["bad_rules_file"] = (rc == 2 and "rules.json" in err, [rc, err.strip()[:150]])
    rc, _, err = _run([inp / "good_ct", args.work / "o4", "--bundle", args.work / "nobundle", "--no-progress"])
    results["bundle_missing"] = (rc == 2 and len(err.strip().splitlines()) == 1, [rc, err.strip()[:150]])
    rc, _, err = _run([inp / "good_ct", args.work / "o5", *base, "--formats", "sr"])
    results["sr_without_seg"] = (rc == 2 and "needs seg" in err, [rc, err.strip()[:150]])
    nested = inp / "good_ct" / "results"
    _run([inp / "good_ct", nested, *base])
    rc, stdout, _ = _run([inp / "good_ct", nested, *base])
    results["out_inside_in_rerun"] = (rc == 0 and "1 already done" in stdout and "0 done" in stdout, [stdout.strip()])
    shutil.rmtree(nested)
    rerun_in, rerun_out = args.work / "rerun_in", args.work / "rerun_out"
    ps = _ct(rerun_in / "s")
    _run([rerun_in, rerun_out, *base])
    dark = make_standin_bundle(args.work / "dark", network_def={"_target_": "support.dicom.ThresholdNet", "threshold": 5.0})
    rc, _, _ = _run([rerun_in, rerun_out, "--bundle", dark, *base[2:], "--overwrite"])
    (row,) = [r for r in _rows(rerun_out) if r["kind"] == "dicom"]
    left = sorted(p.name for p in (rerun_out / row["study_uid"]).iterdir())
    results["rerun_empty_drops_old_seg"] = (row["status"] == "empty" and not any(x.endswith(".seg.dcm") for x in left),
                                            left)
    ds = pydicom.dcmread(ps[2])
    del ds.PixelData
    ds.save_as(ps[2])
    rc, _, _ = _run([rerun_in, rerun_out, *base, "--overwrite"])
    left = sorted(p.name for p in (rerun_out / row["study_uid"]).iterdir())
    results["rerun_failed_drops_old_outputs"] = (rc == 1 and not left, left)
    old = os.umask(0o022)
    try:
        _run([inp / "good_ct", args.work / "o6", *base, "--formats", "seg,nifti,rtstruct,sr,qc"])
    finally:
        os.umask(old)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (args.work / "o6").rglob("*") if p.is_file()
             and not p.name.startswith(".")}
    results["modes_follow_umask"] = (modes == {0o644}, sorted(oct(m) for m in modes))
    for name, (ok, detail) in results.items():
        print(f"{'ok  ' if ok else 'BAD '} {name}: {detail}")
    n_ok = sum(ok for ok, _ in results.values())
    print(f"cases tried: {len(results)}, handled cleanly: {n_ok}")
    (args.work / "report.json").write_text(json.dumps({k: {"ok": ok, "detail": d} for k, (ok, d) in results.items()},
                                                      indent=2, default=str))
    return 0 if n_ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
