# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Regression tests for the twelve bad-input cases of issue 13 (``ulite-dicom`` and ``monai.bundle run``).

Each case is generated here. The batch runs in this process against the stand-in bundle (threshold
"network" on the scaled input, so every label is known) unless a case needs the real bundle config.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from support.dicom import make_standin_bundle, phantom, read_manifest, rotation
from support.dicom_write import write_dicom_series
from test_batch_cli import run_main

from ulite_monai.io.dicom_series import SeriesRejectedError, discover_inputs, load_series_volume

ARGS = ["--random-weights", "--no-progress"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_standin_bundle(tmp_path_factory.mktemp("standin"))


def _batch(capsys, inp, out, bundle, *extra):
    return run_main([inp, out, "--bundle", bundle, *ARGS, *extra], capsys)


def _rows(out, **kw):
    return [r for r in read_manifest(out).values() if all(r.get(k) == v for k, v in kw.items())]


# 1 ------------------------------------------------------------------------------------------------------------
def test_01_monochrome1_gives_the_same_hu_as_its_monochrome2_twin(tmp_path):
    vol = phantom((6, 12, 14), seed=5)
    vol[:, :2, :] = -997  # air band on every slice
    geo = {"origin": (1, 2, 3), "spacing": (0.8, 0.8, 2.0), "rescale": (1.0, -1024.0)}
    write_dicom_series(vol, tmp_path / "m2", **geo)
    write_dicom_series(vol, tmp_path / "m1", extra={"PhotometricInterpretation": "MONOCHROME1"}, **geo)
    (m2,) = discover_inputs(tmp_path / "m2").series
    (m1,) = discover_inputs(tmp_path / "m1").series
    v2, v1 = load_series_volume(m2), load_series_volume(m1)
    np.testing.assert_array_equal(v1.array, v2.array)
    np.testing.assert_array_equal(v1.array, vol)  # HU as stored + rescale, on every slice
    assert np.all(v1.array[:, :2, :] == -997)
    assert any("MONOCHROME1" in n for n in v1.notes) and not any("MONOCHROME1" in n for n in v2.notes)


# 2 + 10 -------------------------------------------------------------------------------------------------------
def test_02_10_truncated_nifti_and_lost_causes_fail_with_the_underlying_error(tmp_path, bundle, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    img = nib.Nifti1Image(phantom((20, 16, 12)).astype(np.int16), np.eye(4))
    nib.save(img, str(inp / "good.nii.gz"))
    raw = (inp / "good.nii.gz").read_bytes()
    (inp / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.int16), np.eye(4)), str(inp / "flat2d.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6, 3, 2), np.int16), np.eye(4)), str(inp / "fived.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(phantom((5, 6, 7))), str(inp / "lonely.mhd"))
    (inp / "lonely.raw").unlink()
    rc, _, err = _batch(capsys, inp, out, bundle)
    assert rc == 1, err[-2000:]
    rows = {Path(r["input"]).name: r for r in read_manifest(out).values()}
    assert rows["good.nii.gz"]["status"] == "done"
    assert rows["cut.nii.gz"]["status"] == "failed" and "truncated" in rows["cut.nii.gz"]["reason"]
    assert rows["lonely.mhd"]["status"] == "failed" and "lonely.raw is missing" in rows["lonely.mhd"]["reason"]
    for name in ("cut.nii.gz", "flat2d.nii.gz", "fived.nii.gz", "lonely.mhd"):
        reason = rows[name]["reason"]
        assert rows[name]["status"] == "failed" and reason, name
        assert "applying transform" not in reason and " object at 0x" not in reason, (name, reason)


def test_10_disk_full_reason_names_the_cause(tmp_path, bundle, capsys, monkeypatch):
    from monai.data import NibabelWriter

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(NibabelWriter, "write", full)
    write_dicom_series(phantom((6, 10, 10)), tmp_path / "in" / "s")
    rc, _, _ = _batch(capsys, tmp_path / "in", tmp_path / "out", bundle, "--rules", "all")
    (row,) = _rows(tmp_path / "out", kind="dicom")
    assert rc == 1 and row["status"] == "failed"
    assert "No space left on device" in row["reason"] and row["reason"].startswith("SaveImaged: OSError")


# 3 ------------------------------------------------------------------------------------------------------------
def test_03_same_series_uid_in_two_studies_gets_two_results(tmp_path, bundle, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    for i, study in enumerate(("1.2.826.0.1.1", "1.2.826.0.1.2")):
        write_dicom_series(phantom((8, 10, 10), seed=i), inp / f"st{i}", study_uid=study, series_uid="1.2.826.0.1.9")
    rc, _, err = _batch(capsys, inp, out, bundle, "--rules", "all")
    assert rc == 0, err[-2000:]
    done = _rows(out, status="done")
    assert sorted(r["study_uid"] for r in done) == ["1.2.826.0.1.1", "1.2.826.0.1.2"]
    assert len({r["outputs"]["seg"] for r in done}) == 2 and all((out / r["outputs"]["seg"]).is_file() for r in done)
    rc, stdout, _ = _batch(capsys, inp, out, bundle, "--rules", "all")
    assert rc == 0 and "2 already done" in stdout


# 4 ------------------------------------------------------------------------------------------------------------
def test_04_colliding_output_names_stay_apart(tmp_path, bundle, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    vols = {}
    for i, name in enumerate(("dup.nii.gz", "dup.nrrd", "a b.nii.gz", "a_b.nii.gz", "Case.nii.gz", "case.nii.gz")):
        arr = phantom((8, 9, 10), seed=40 + i, radius=2.0 + i)  # each input has its own answer
        vols[name] = arr
        img = sitk.GetImageFromArray(arr)
        sitk.WriteImage(img, str(inp / name))
    for uid in ("1.2.3.4/5", "1.2.3.4_5"):
        write_dicom_series(phantom((6, 8, 8), seed=len(uid)), inp / uid.replace("/", "-"), study_uid="1.2.3",
                           series_uid=uid)
    rc, _, err = _batch(capsys, inp, out, bundle, "--rules", "all")
    assert rc == 0, err[-2000:]
    rows = read_manifest(out)
    paths = [p for r in rows.values() for p in (r.get("outputs") or {}).values()]
    assert len(paths) == len({p.casefold() for p in paths})  # no two rows share a file
    for name, arr in vols.items():
        (row,) = [r for r in rows.values() if r["kind"] == "file" and Path(r["input"]).name == name]
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / row["outputs"]["nifti"])))
        np.testing.assert_array_equal(lab, (arr > 0).astype(np.uint8), err_msg=name)
    assert len(_rows(out, kind="dicom", status="done")) == 2


# 5 ------------------------------------------------------------------------------------------------------------
def test_05_rerun_empty_or_failed_leaves_no_older_result(tmp_path, bundle, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    paths = write_dicom_series(phantom((6, 10, 10)), inp / "s")
    assert _batch(capsys, inp, out, bundle, "--rules", "all", "--formats", "seg,nifti,rtstruct,qc")[0] == 0
    (row,) = _rows(out, kind="dicom")
    stem = out / row["outputs"]["seg"][: -len(".seg.dcm")]
    assert {"seg", "nifti", "rtstruct", "qc"} <= set(row["outputs"])
    dark = make_standin_bundle(tmp_path / "dark", network_def={"_target_": "support.dicom.ThresholdNet",
                                                                "threshold": 5.0})
    rc, _, _ = _batch(capsys, inp, out, dark, "--rules", "all", "--overwrite")
    (row,) = _rows(out, kind="dicom")
    assert rc == 0 and row["status"] == "empty"
    left = sorted(p.name for p in stem.parent.iterdir())
    assert left == sorted(Path(p).name for p in row["outputs"].values()), left  # NIfTI + preview only
    assert not stem.with_name(stem.name + ".seg.dcm").exists()
    ds = pydicom.dcmread(paths[3])
    del ds.PixelData
    ds.save_as(paths[3])
    rc, _, _ = _batch(capsys, inp, out, bundle, "--rules", "all", "--overwrite")
    (row,) = _rows(out, kind="dicom")
    assert rc == 1 and row["status"] == "failed" and not list(stem.parent.iterdir())


# 6 ------------------------------------------------------------------------------------------------------------
def _rounded_oblique(folder, tilt_mm_per_slice=0.0, **kw):
    vol = phantom((16, 24, 20), seed=6)
    direction = rotation(0, 18, 0)  # oblique about one axis, as an oblique MR stack
    paths = write_dicom_series(vol, folder, origin=(-100.03, 20.07, 33.31), spacing=(0.86, 0.86, 3.3),
                               direction=direction, modality="MR", **kw)
    for k, p in enumerate(paths):  # the scanner writes ImagePositionPatient to 0.1 mm
        ds = pydicom.dcmread(p)
        pos = np.array([float(v) for v in ds.ImagePositionPatient]) + k * tilt_mm_per_slice * direction[:, 0]
        ds.ImagePositionPatient = [f"{v:.1f}" for v in pos]
        ds.save_as(p)
    return vol, direction


def test_06_positions_rounded_to_a_tenth_mm_are_tolerated_and_tilt_is_rejected(tmp_path, bundle, capsys):
    vol, direction = _rounded_oblique(tmp_path / "in" / "ge")
    (s,) = discover_inputs(tmp_path / "in" / "ge").series
    v = load_series_volume(s)
    np.testing.assert_array_equal(v.array, vol)
    assert v.geometry == "regular, rounded positions tolerated" and not v.resampled
    assert abs(v.spacing[2] - 3.3) < 0.02 and np.allclose(v.direction, direction, atol=1e-3)
    with pytest.raises(SeriesRejectedError, match="tolerance 0.043 mm"):  # the old fixed tolerance, now a setting
        load_series_volume(s, position_tolerance=0.05)
    _rounded_oblique(tmp_path / "in" / "tilted", tilt_mm_per_slice=0.6)
    (t,) = discover_inputs(tmp_path / "in" / "tilted").series
    with pytest.raises(SeriesRejectedError, match=r"tilted or sheared stack.*tilt 10\.\d+ deg"):
        load_series_volume(t)
    rc, _, _ = _batch(capsys, tmp_path / "in", tmp_path / "out", bundle, "--rules", "all")
    rows = {Path(r["input"]).name: r for r in _rows(tmp_path / "out", kind="dicom")}
    assert rc == 1
    assert rows["ge"]["status"] == "done" and rows["ge"]["geometry"] == "regular, rounded positions tolerated"
    assert any("rounded by the scanner" in n for n in rows["ge"]["notes"])
    assert rows["tilted"]["status"] == "failed" and "tilted or sheared" in rows["tilted"]["reason"]


# 7 ------------------------------------------------------------------------------------------------------------
def test_07_outputs_follow_the_umask(tmp_path, bundle, capsys):
    write_dicom_series(phantom((6, 10, 10)), tmp_path / "in" / "s")
    old = os.umask(0o022)
    try:
        rc, _, _ = _batch(capsys, tmp_path / "in", tmp_path / "out", bundle, "--rules", "all",
                          "--formats", "seg,nifti,rtstruct,sr,qc")
    finally:
        os.umask(old)
    assert rc == 0
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert len(files) >= 7  # SEG, NIfTI, RTSTRUCT, SR, preview, manifest, summary
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


# 8 ------------------------------------------------------------------------------------------------------------
def test_08_unusable_output_folder_has_its_own_exit_code(tmp_path, bundle, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        rc, stdout, err = _batch(capsys, tmp_path / "in", out, bundle)
        assert rc == 3 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert str(out) in err
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        rc, _, err = _batch(capsys, tmp_path / "in", ro, bundle)
        assert rc == 3 and "cannot be written" in err


# 9 ------------------------------------------------------------------------------------------------------------
def test_09_output_inside_input_is_never_read(tmp_path, bundle, capsys):
    inp = tmp_path / "in"
    write_dicom_series(phantom((6, 10, 10)), inp / "s")
    nib.save(nib.Nifti1Image(phantom((8, 8, 8)), np.eye(4)), str(inp / "v.nii.gz"))
    out = inp / "results"
    assert _batch(capsys, inp, out, bundle, "--rules", "all")[0] == 0
    rc, stdout, _ = _batch(capsys, inp, out, bundle, "--rules", "all")
    assert rc == 0 and "2 already done" in stdout and "0 done" in stdout
    rows = read_manifest(out)
    assert not [k for k in rows if "results" in k and not rows[k]["status"] == "skipped"]
    moved = tmp_path / "in" / "old_run"  # an earlier output folder moved into the input tree
    out.rename(moved)
    rc, stdout, _ = _batch(capsys, inp, tmp_path / "out2", bundle, "--rules", "all")
    rows = read_manifest(tmp_path / "out2")
    assert rc == 0 and sum(r["status"] == "done" for r in rows.values()) == 2
    assert any(r["status"] == "skipped" and "output folder of a ulite-dicom run" in r["reason"] for r in rows.values())


# 11 -----------------------------------------------------------------------------------------------------------
def test_11_damaged_instance_fails_its_series_by_one_rule(tmp_path, bundle, capsys):
    inp = tmp_path / "in"
    head = write_dicom_series(phantom((8, 10, 10)), inp / "header_cut")
    head[3].write_bytes(head[3].read_bytes()[:400])  # cut before the study/series UIDs
    pix = write_dicom_series(phantom((8, 10, 10)), inp / "pixels_cut")
    pix[5].write_bytes(pix[5].read_bytes()[:-60])
    rc, _, _ = _batch(capsys, inp, tmp_path / "out", bundle, "--rules", "all")
    rows = {Path(r["input"]).name: r for r in _rows(tmp_path / "out", kind="dicom")}
    assert rc == 1
    for name, path in (("header_cut", head[3]), ("pixels_cut", pix[5])):
        assert rows[name]["status"] == "failed", rows[name]
        assert f"damaged instance {path}" in rows[name]["reason"], rows[name]["reason"]
    assert not _rows(tmp_path / "out", kind="file")  # the cut file is not a row of its own


# 12 -----------------------------------------------------------------------------------------------------------
def test_12_bundle_run_on_a_folder_skips_bad_files_and_segments_the_rest(tmp_path):
    from monai.bundle import ConfigWorkflow
    from support.bundle import CONFIGS

    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(2):
        sitk.WriteImage(sitk.GetImageFromArray(phantom((20, 24, 24), seed=i)), str(inp / f"good{i}.nii.gz"))
    raw = (inp / "good0.nii.gz").read_bytes()
    (inp / "a_cut.nii.gz").write_bytes(raw[: len(raw) // 2])  # sorted first: the run must go on past it
    (inp / "b_junk.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    ckpt = tmp_path / "m.pt"
    torch.save({"weight": torch.tensor([0.0, 50.0]).reshape(2, 1, 1, 1, 1), "bias": torch.tensor([0.0, -25.0])}, ckpt)
    wf = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), meta_file=str(CONFIGS / "metadata.json"),
                        workflow_type="infer", input=str(inp), output_dir=str(tmp_path / "out"), ckpt_path=str(ckpt),
                        network_def={"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2,
                                     "kernel_size": 1},
                        pixdim=[2.0, 2.0, 2.0], roi_size=[32, 32, 32])
    wf.initialize()
    wf.run()
    made = sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz"))
    assert made == ["good0_seg.nii.gz", "good1_seg.nii.gz"]
    errors = [json.loads(x) for x in (tmp_path / "out" / "failed_inputs.jsonl").read_text().splitlines()]
    assert sorted(Path(e["image"]).name for e in errors) == ["a_cut.nii.gz", "b_junk.nii.gz"]
    assert "truncated" in errors[0]["error"]


def test_files_without_preamble_are_read_not_only_discovered(tmp_path):
    vol = phantom((5, 10, 10), seed=9)
    for p in write_dicom_series(vol, tmp_path / "s"):
        p.write_bytes(p.read_bytes()[132:])  # no 128-byte preamble, no "DICM"
    (s,) = discover_inputs(tmp_path / "s").series
    np.testing.assert_array_equal(load_series_volume(s).array, vol)
