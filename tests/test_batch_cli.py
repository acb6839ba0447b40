# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""End-to-end tests of ``python -m ulite_monai.batch`` (the ``ulite-dicom`` console script).

These run the CLI in a subprocess against a stand-in bundle with the same config ids as the ulite
bundle (SimpleITK LoadImaged, sliding window, Invertd, SaveImaged) and a deterministic threshold
"network", so every output voxel can be predicted from the input.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from support.dicom import (
    REPO,
    TESTS,
    dciodvfy_errors,
    make_standin_bundle,
    phantom,
    read_manifest,
    require_dciodvfy,
    rotation,
    run_cli,
    seg_frames_by_source,
)
from pydicom.data import get_testdata_file

from ulite_monai.batch.cli import main
from support.dicom_write import write_dicom_series


def run_main(args, capsys):
    """The CLI in this process (saves an interpreter start and the torch/MONAI imports)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _ref_image(vol, origin, spacing, direction):
    img = sitk.GetImageFromArray(vol)
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetDirection(tuple(float(v) for v in np.asarray(direction).flatten()))
    return img


@pytest.fixture(scope="module")
def batch_tree(tmp_path_factory):
    """A night's export: two studies, good/empty/short/broken series, junk, an SR, volume files."""
    root = tmp_path_factory.mktemp("batch")
    inp = root / "in"
    ct = phantom((10, 18, 20), seed=11)
    ct_geo = {
        "origin": (-30.0, 12.0, 45.5),
        "spacing": (0.8, 0.75, 2.5),
        "direction": rotation(20, -12, 33) @ np.diag([1, 1, -1]),
    }
    rng = np.random.default_rng(0)
    ct_paths = write_dicom_series(
        ct,
        inp / "study1" / "ct",
        rescale=(1.0, -1024.0),
        file_names=[f"{n:03d}" for n in rng.permutation(10)],
        **ct_geo,
    )
    study1 = pydicom.dcmread(ct_paths[0]).StudyInstanceUID
    dark = np.full((10, 12, 12), -600, np.int16)
    write_dicom_series(dark, inp / "study1" / "mr_dark", modality="MR", study_uid=study1, series_number=2)
    write_dicom_series(phantom((3, 8, 8)), inp / "study2" / "ct_short", series_number=3)
    bad = write_dicom_series(phantom((9, 8, 8)), inp / "study2" / "ct_nopix", series_number=4)
    ds = pydicom.dcmread(bad[4])
    del ds.PixelData
    ds.save_as(bad[4])
    (inp / "README.txt").write_text("exported by PACS")
    (inp / "study2" / "half.dcm").write_bytes(Path(bad[0]).read_bytes()[:300])
    shutil.copy(get_testdata_file("test-SR.dcm"), inp / "study2" / "sr.dcm")
    # volume files: NIfTI (RAS affine, via nibabel) and NRRD (via SimpleITK)
    nii_vol = phantom((12, 10, 8), seed=12).transpose(2, 1, 0)  # x, y, z
    affine = np.diag([1.2, 0.9, 2.0, 1.0])
    affine[:3, 3] = (10, -5, 3)
    (inp / "vols").mkdir()
    nib.save(nib.Nifti1Image(nii_vol, affine), str(inp / "vols" / "case a.nii.gz"))
    nrrd = _ref_image(phantom((7, 9, 11), seed=13), (1, 2, 3), (0.5, 0.6, 1.5), rotation(0, 0, 90))
    sitk.WriteImage(nrrd, str(inp / "vols" / "case_b.nrrd"))
    bundle = make_standin_bundle(root / "bundle")
    out = root / "out"
    t0 = time.time()
    first = run_cli([inp, out, "--bundle", bundle, "--random-weights", "--no-progress"])
    first_s = time.time() - t0
    return {
        "root": root,
        "in": inp,
        "out": out,
        "bundle": bundle,
        "ct": ct,
        "ct_geo": ct_geo,
        "ct_paths": ct_paths,
        "nii": (nii_vol, affine),
        "nrrd": nrrd,
        "first": first,
        "first_s": first_s,
    }


def _rows_by(rows, **kw):
    return [r for r in rows.values() if all(r.get(k) == v for k, v in kw.items())]


def test_batch_statuses_and_reasons(batch_tree):
    r, out = batch_tree["first"], batch_tree["out"]
    assert r.returncode == 1, r.stderr[-3000:]  # one failed series -> exit 1, the batch still finished
    assert "2 done" in r.stdout or "3 done" in r.stdout, r.stdout
    rows = read_manifest(out)
    ct = _rows_by(rows, modality="CT", slices=10)
    assert len(ct) == 1 and ct[0]["status"] == "done" and ct[0]["reason"] == ""
    assert _rows_by(rows, modality="MR")[0]["status"] == "empty"
    assert "no voxel" in _rows_by(rows, modality="MR")[0]["reason"]
    short = _rows_by(rows, slices=3)[0]
    assert short["status"] == "skipped" and "NumberOfSeriesRelatedInstances=3" in short["reason"]
    failed = _rows_by(rows, status="failed")
    assert len(failed) == 1 and "slice_0004.dcm: no pixel data" in failed[0]["reason"]
    skipped_files = {Path(r["input"]).name: r["reason"] for r in _rows_by(rows, status="skipped", kind="file")}
    assert "not a DICOM file" in skipped_files["README.txt"]
    assert "half.dcm" in skipped_files
    assert any("Comprehensive SR" in r["reason"] for r in _rows_by(rows, status="skipped"))
    vols = _rows_by(rows, kind="file", status="done")
    assert sorted(Path(r["input"]).name for r in vols) == ["case a.nii.gz", "case_b.nrrd"]
    for row in rows.values():  # file names come from sanitised UIDs / paths only
        for p in (row.get("outputs") or {}).values():
            assert " " not in p and (out / p).is_file()
    assert not (out / ".tmp").exists() and not list(out.rglob(".tmp-*"))


def test_seg_and_nifti_geometry_voxel_for_voxel(batch_tree):
    require_dciodvfy()
    out, ct, paths = batch_tree["out"], batch_tree["ct"], batch_tree["ct_paths"]
    row = _rows_by(read_manifest(out), modality="CT", slices=10)[0]
    seg_path = out / row["outputs"]["seg"]
    assert seg_path.name.endswith(".seg.dcm") and seg_path.parent.name == row["study_uid"]
    assert dciodvfy_errors(seg_path) == []
    seg = pydicom.dcmread(seg_path)
    assert seg.SegmentSequence[0].SegmentLabel == "spleen"
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "ulite-standin"
    src = {}
    for k, p in enumerate(paths):
        d = pydicom.dcmread(p, stop_before_pixels=True)
        src[str(d.SOPInstanceUID)] = (k, [float(v) for v in d.ImagePositionPatient])
    refs = {x.ReferencedSOPInstanceUID for x in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == set(src)
    frames = seg_frames_by_source(seg_path)
    expected = ct > 0  # threshold net on HU > 0
    for uid, (k, ipp) in src.items():
        mask = frames[uid][0] if uid in frames else np.zeros(ct.shape[1:], np.uint8)
        np.testing.assert_array_equal(mask, expected[k].astype(np.uint8))
        if uid in frames:
            np.testing.assert_allclose(frames[uid][1], ipp, atol=1e-4)
    # NIfTI label in the source geometry: same voxels at the same physical points
    label = sitk.ReadImage(str(out / row["outputs"]["nifti"]))
    ref = _ref_image(ct, **batch_tree["ct_geo"])
    back = sitk.Resample(label, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 255)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), expected.astype(np.uint8))
    voxel_ml = np.prod(batch_tree["ct_geo"]["spacing"]) / 1000
    assert row["volumes_ml"]["spleen"] == pytest.approx(expected.sum() * voxel_ml, rel=1e-3)
    assert set(row["timings_s"]) >= {"read", "preprocess", "model", "postprocess", "write", "wait", "total"}


def test_volume_file_inputs_keep_their_grid(batch_tree):
    out = batch_tree["out"]
    rows = read_manifest(out)
    nii_row = [r for r in rows.values() if r.get("input", "").endswith("case a.nii.gz")][0]
    vol, affine = batch_tree["nii"]
    img = nib.load(str(out / nii_row["outputs"]["nifti"]))
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj), (vol > 0).astype(np.uint8))
    nrrd_row = [r for r in rows.values() if r.get("input", "").endswith("case_b.nrrd")][0]
    lab = sitk.ReadImage(str(out / nrrd_row["outputs"]["nifti"]))
    src = batch_tree["nrrd"]
    back = sitk.Resample(lab, src, sitk.Transform(), sitk.sitkNearestNeighbor, 255)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), (sitk.GetArrayFromImage(src) > 0).astype(np.uint8))
    assert "seg" not in nrrd_row["outputs"]


def test_rerun_resumes_and_overwrite_redoes(batch_tree, capsys):
    out, inp, bundle = batch_tree["out"], batch_tree["in"], batch_tree["bundle"]
    before = read_manifest(out)
    ct_row = _rows_by(before, modality="CT", slices=10)[0]
    seg_path = out / ct_row["outputs"]["seg"]
    mtime = seg_path.stat().st_mtime_ns
    n_lines = len((out / "manifest.jsonl").read_text().splitlines())
    rc, stdout, _ = run_main([inp, out, "--bundle", bundle, "--random-weights", "--no-progress"], capsys)
    assert rc == 1  # the broken series is retried and fails again
    assert "4 already done" in stdout, stdout
    assert seg_path.stat().st_mtime_ns == mtime
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == n_lines + 1  # only the retried failure is recorded again
    rc, _, err = run_main(
        [
            inp / "study1" / "ct",
            out,
            "--bundle",
            bundle,
            "--random-weights",
            "--no-progress",
            "--overwrite",
            "--formats",
            "seg",
        ],
        capsys,
    )
    assert rc == 0, err[-2000:]
    assert seg_path.stat().st_mtime_ns != mtime
    row = read_manifest(out)[ct_row["key"]]
    assert row["status"] == "done" and set(row["outputs"]) == {"seg"}


def test_sigkill_mid_batch_then_rerun_completes(tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    n = 5
    for i in range(n):
        write_dicom_series(phantom((12, 20, 20), seed=i), inp / f"s{i}", series_number=i + 1)
    bundle = make_standin_bundle(
        tmp_path / "bundle", network_def={"_target_": "support.dicom.ThresholdNet", "threshold": 0.0, "delay_s": 0.25}
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ulite_monai.batch",
            str(inp),
            str(out),
            "--bundle",
            str(bundle),
            "--random-weights",
            "--no-progress",
        ],
        cwd=str(REPO),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "batch.err", "wb"),
    )
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if manifest.exists() and '"status": "done"' in manifest.read_text():
                break
            time.sleep(0.02)
        assert proc.poll() is None, (
            f"batch ended (rc {proc.poll()}) before it could be killed; manifest: "
            f"{manifest.read_text()[-2000:] if manifest.exists() else None}; stderr: "
            f"{(tmp_path / 'batch.err').read_text(errors='replace')[-3000:]}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    done_at_kill = sum(1 for r in read_manifest(out).values() if r["status"] == "done")
    assert 1 <= done_at_kill < n
    for p in out.rglob("*.seg.dcm"):  # whatever has a final name is complete
        pydicom.dcmread(p).pixel_array
    rc, stdout, err = run_main([inp, out, "--bundle", bundle, "--random-weights", "--no-progress"], capsys)
    assert rc == 0, err[-3000:]
    assert f"{done_at_kill} already done" in stdout
    rows = read_manifest(out)
    assert sorted(r["status"] for r in rows.values()) == ["done"] * n
    assert not (out / ".tmp").exists() and not list(out.rglob(".tmp-*"))
    for row in rows.values():
        seg = pydicom.dcmread(out / row["outputs"]["seg"])
        assert seg.pixel_array.any()
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(out / row["outputs"]["nifti"]))).any()


def test_cli_help_and_bad_arguments(tmp_path, capsys):
    r = run_cli(["--help"])
    assert r.returncode == 0 and "--overwrite" in r.stdout and "--rules" in r.stdout and "--formats" in r.stdout
    (tmp_path / "in").mkdir()
    rc, _, err = run_main(
        [tmp_path / "in", tmp_path / "out", "--bundle", tmp_path / "nobundle", "--no-progress"], capsys
    )
    assert rc == 2 and "nobundle" in err and "no MONAI bundle" in err
    bad_rules = tmp_path / "rules.json"
    bad_rules.write_text("[]")
    rc, _, err = run_main([tmp_path / "in", tmp_path / "out", "--rules", bad_rules], capsys)
    assert rc == 2 and "rules.json" in err
    rc, _, err = run_main([tmp_path / "missing", tmp_path / "out"], capsys)
    assert rc == 2 and "does not exist" in err
