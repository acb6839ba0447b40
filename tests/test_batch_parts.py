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
