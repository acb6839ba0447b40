# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Batch building blocks: manifest resume rules, read-ahead bounds, grid mapping."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ulite_monai.batch.manifest import Manifest
from ulite_monai.batch.worker import to_volume_order
from ulite_monai.batch.prefetch import Prefetcher


def test_manifest_last_row_wins_and_torn_line_ignored(tmp_path):
    m = Manifest(tmp_path / "manifest.jsonl")
    (tmp_path / "a.dcm").write_bytes(b"x")
    m.append({"key": "k1", "status": "failed", "reason": "boom", "model_version": "v1"})
    m.append({"key": "k1", "status": "done", "model_version": "v1", "outputs": {"seg": "a.dcm"}})
    with open(m.path, "a") as f:
        f.write('{"key": "k2", "status": "do')  # a writer killed mid-line
    m2 = Manifest(m.path)
    assert m2.torn_lines == 1 and "k2" not in m2.rows
    assert m2.is_finished("k1", "v1", tmp_path)
    assert not m2.is_finished("k1", "v2", tmp_path)  # another model version redoes it
    (tmp_path / "a.dcm").unlink()
    assert not m2.is_finished("k1", "v1", tmp_path)  # missing output redoes it
    m2.append({"key": "k2", "status": "empty", "model_version": "v1"})
    m3 = Manifest(m.path)
    assert m3.rows["k2"]["status"] == "empty" and m3.torn_lines == 1
    with pytest.raises(ValueError, match="status"):
        m3.append({"key": "k3", "status": "ok"})


def test_prefetcher_reads_ahead_but_holds_at_most_two_items():
    alive, peak, lock = [0], [0], threading.Lock()

    def load(i):
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
        time.sleep(0.01)
        return i

    f = Prefetcher(list(range(6)), load, slots=2)
    f.start()
    seen = []
    for item in f:
        time.sleep(0.03)  # "inference": the next item must be loading meanwhile
        seen.append(item)
        with lock:
            alive[0] -= 1
        f.release()
    f.join(timeout=5)
    assert seen == list(range(6)) and peak[0] == 2


def test_to_volume_order_undoes_reader_axis_order_and_flips():
    rng = np.random.default_rng(0)
    krc = rng.integers(0, 3, (4, 5, 6)).astype(np.uint8)  # [slice, row, column]
    vol_aff = np.eye(4)
    vol_aff[:3, :3] = np.diag([0.5, 0.7, 2.0]) @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])
    vol_aff[:3, 3] = (3, 4, 5)
    # the same grid seen as an (x, y, z) array with the first axis flipped
    xyz = np.flip(krc.transpose(2, 1, 0), axis=0)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, 5  # index i -> 5 - i
    pred_aff = vol_aff @ flip
    np.testing.assert_array_equal(to_volume_order(xyz, pred_aff, vol_aff, krc.shape), krc)
    shifted = pred_aff.copy()
    shifted[:3, 3] += vol_aff[:3, 0] * 0.5
    with pytest.raises(ValueError, match="shifted"):
        to_volume_order(xyz, shifted, vol_aff, krc.shape)
    with pytest.raises(ValueError, match="not on the input grid"):
        to_volume_order(xyz, pred_aff @ np.diag([2.0, 1, 1, 1]), vol_aff, krc.shape)


# ---------------------------------------------------------------------- plan and worker, through their public API


def _tree(tmp_path):
    """Two series of one study (one with a single plane), a volume file and a junk file."""
    import nibabel as nib
    from support.dicom import phantom
    from support.dicom_write import write_dicom_series

    inp = tmp_path / "in"
    write_dicom_series(phantom((8, 20, 24)), inp / "s1", spacing=(1.0, 1.0, 2.0), study_uid="1.2.3",
                       series_uid="1.2.3.1", series_number=1)
    write_dicom_series(phantom((1, 20, 24)), inp / "s2", study_uid="1.2.3", series_uid="1.2.3.2", series_number=2)
    nib.save(nib.Nifti1Image(phantom((12, 10, 9)), np.diag([1.5, 1.5, 2.0, 1.0])), str(inp / "vol a.nii.gz"))
    (inp / "notes.txt").write_text("not an image")
    return inp


def test_plan_names_outputs_skips_with_reasons_and_resumes(tmp_path):
    from ulite_monai.batch.plan import plan_batch

    inp, out = _tree(tmp_path), tmp_path / "out"
    m = Manifest(out / "manifest.jsonl")
    plan = plan_batch(inp, out, m, "model v1")
    keys = [it.key for it in plan.todo]
    assert len(keys) == 3 and "file:vol a.nii.gz" in keys  # the 1-plane series is planned; the worker rejects it
    stems = {it.key: it.out_stem for it in plan.todo}
    assert stems["file:vol a.nii.gz"] == "volumes/vol_a"
    assert any(s == "1.2.3/1.2.3.1" for s in stems.values())
    assert [r["input"] for r in plan.skipped] == ["notes.txt"] and plan.skipped[0]["status"] == "skipped"
    # a finished series with the same model version and its outputs present is not redone
    (out / "1.2.3").mkdir(parents=True)
    (out / "1.2.3" / "1.2.3.1.seg.dcm").write_bytes(b"x")
    done_key = next(k for k, s in stems.items() if s == "1.2.3/1.2.3.1")
    m.append({"key": done_key, "status": "done", "model_version": "model v1", "outputs": {"seg": "1.2.3/1.2.3.1.seg.dcm"}})
    again = plan_batch(inp, out, m, "model v1")
    assert again.already_done == 1 and done_key not in [it.key for it in again.todo]
    assert len(plan_batch(inp, out, m, "model v2").todo) == 3  # another model redoes it
    assert len(plan_batch(inp, out, m, "model v1", overwrite=True).todo) == 3
    rules = {"selections": [{"name": "CT", "conditions": {"Modality": "MR"}}]}
    sel = plan_batch(inp, out, Manifest(tmp_path / "m2.jsonl"), "model v1", rules=rules)
    assert all(it.kind == "file" for it in sel.todo) and len(sel.skipped) == 3  # both CT series not selected


def test_worker_segments_one_item_and_keeps_errors_in_the_result(tmp_path):
    from support.dicom import make_standin_bundle

    from ulite_monai.batch.plan import plan_batch
    from ulite_monai.batch.worker import SeriesWorker
    from ulite_monai.bundle import Bundle

    inp, out = _tree(tmp_path), tmp_path / "out"
    staging = out / ".tmp" / "staging"
    staging.mkdir(parents=True)
    pipe = Bundle(make_standin_bundle(tmp_path / "bundle")).pipeline(random_weights=True, output_dir=staging)
    worker = SeriesWorker(pipe, out, out / ".tmp", staging)
    plan = plan_batch(inp, out, Manifest(out / "manifest.jsonl"), pipe.model_version)
    by_key = {it.key: it for it in plan.todo}
    series = next(it for it in plan.todo if it.out_stem.endswith("1.2.3.1"))
    ld = worker.load(series)
    assert ld.error is None and ld.volume.array.shape == (8, 20, 24) and ld.temp_path.is_file()
    row = worker.process(ld)
    worker.cleanup(ld)
    assert row["status"] == "done" and row["shape"] == [8, 20, 24] and row["volumes_ml"]
    assert (out / row["outputs"]["seg"]).is_file() and (out / row["outputs"]["nifti"]).is_file()
    assert not ld.temp_path.exists() and not any(staging.iterdir())
    one_plane = next(it for it in plan.todo if it.kind == "dicom" and it is not series)
    bad = worker.load(one_plane)
    assert bad.error is not None and "plane" in str(bad.error)
    with pytest.raises(type(bad.error)):
        worker.process(bad)
    vol = worker.process(worker.load(by_key["file:vol a.nii.gz"]))
    assert vol["outputs"] == {"nifti": "volumes/vol_a.nii.gz", "qc": "volumes/vol_a.qc.png"} and vol["status"] == "done"
    import nibabel as nib

    assert nib.load(str(out / vol["outputs"]["nifti"])).shape == (12, 10, 9)  # the input's grid
