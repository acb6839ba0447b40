# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Helpers for the scale-out tests (Ray, shards): a small mixed cohort, a stand-in network that says which
process is mid-series, a loopback Ray cluster, and the checks every fault test makes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch

from support.dicom import REPO, TESTS, ThresholdNet, make_standin_bundle, phantom
from support.dicom_write import write_dicom_series


class MarkedThresholdNet(ThresholdNet):
    """:class:`ThresholdNet` that touches ``<busy_dir>/<pid>`` when a forward pass starts (then sleeps
    ``delay_s``): a test sees which process is in the middle of a series and can kill it there."""

    def __init__(self, threshold: float = 0.0, delay_s: float = 0.0, busy_dir: str = "") -> None:
        super().__init__(threshold, delay_s)
        self.busy_dir = busy_dir

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.busy_dir:
            Path(self.busy_dir, str(os.getpid())).touch()
        return super().forward(x)


def make_cohort(root: Path, n_good: int = 6) -> Path:
    """``root/in``: ``n_good`` CT series with a blob, an MR series with nothing to segment (empty), a series with a
    slice lacking pixel data (failed), a 3-slice series (skipped by the rules), a text file and a NIfTI volume."""
    inp = root / "in"
    for i in range(n_good):
        write_dicom_series(phantom((10, 18, 20), seed=100 + i), inp / f"p{i}" / "ct", series_number=i + 1,
                           patient_id=f"P{i}")
    write_dicom_series(np.full((10, 12, 12), -600, np.int16), inp / "mr_dark", modality="MR", series_number=50)
    bad = write_dicom_series(phantom((9, 8, 8), seed=7), inp / "ct_nopix", series_number=51)
    ds = pydicom.dcmread(bad[4])
    del ds.PixelData
    ds.save_as(bad[4])
    write_dicom_series(phantom((3, 8, 8), seed=8), inp / "ct_short", series_number=52)
    (inp / "README.txt").write_text("exported by PACS")
    (inp / "vols").mkdir(parents=True)
    affine = np.diag([1.2, 0.9, 2.0, 1.0])
    nib.save(nib.Nifti1Image(phantom((12, 10, 8), seed=9).transpose(2, 1, 0), affine), str(inp / "vols" / "v.nii.gz"))
    return inp


def marked_bundle(root: Path, busy_dir: Path, delay_s: float) -> Path:
    """The stand-in bundle with :class:`MarkedThresholdNet` (same name/version: same model version)."""
    busy_dir.mkdir(parents=True, exist_ok=True)
    return make_standin_bundle(root, network_def={"_target_": "support.scaleout.MarkedThresholdNet", "threshold": 0.0,
                                                  "delay_s": delay_s, "busy_dir": str(busy_dir)})


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray on the loopback address only
    return env


def start_cli(args: list, log: Path) -> subprocess.Popen:
    """``python -m ulite_monai.batch ARGS`` in the background (stdout+stderr to ``log``)."""
    f = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "ulite_monai.batch", *map(str, args)], stdout=f,
                            stderr=subprocess.STDOUT, env=cli_env(), cwd=str(REPO), start_new_session=True)


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ``cond()`` until it returns something truthy; fail with ``what`` (and the log tail) on timeout or when
    ``proc`` ends first."""
    t = time.time()
    while time.time() - t < timeout:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{tail(log)}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{tail(log)}")


def tail(log: Path | None, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log is not None and log.exists() else ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[-1].startswith("Z"))


def busy_pids(busy_dir: Path) -> list[int]:
    """Processes that have started a forward pass and are still alive."""
    return [int(p.name) for p in busy_dir.iterdir() if p.name.isdigit() and alive(int(p.name))] \
        if busy_dir.is_dir() else []


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def manifest_lines(out: Path) -> list[dict]:
    path = out / "manifest.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def assert_exactly_once(out: Path, expected_keys: set[str] | None = None) -> dict[str, dict]:
    """Every series finished (``done``/``empty``) has exactly one such row in the whole manifest history (a
    ``failed`` series is retried by each rerun, so it may have one row per run), every final row's outputs exist,
    no temporary or partial file is left anywhere, and no output file exists that no row names."""
    rows = manifest_lines(out)
    per_key = Counter(r["key"] for r in rows if r["status"] in ("done", "empty"))
    dups = {k: n for k, n in per_key.items() if n > 1}
    assert not dups, f"series committed more than once: {dups}"
    final = {r["key"]: r for r in rows}
    assert all(per_key[k] == 1 for k, r in final.items() if r["status"] in ("done", "empty"))
    if expected_keys is not None:
        assert set(final) == expected_keys, (set(final) ^ expected_keys)
    named = set()
    for r in final.values():
        for rel in (r.get("outputs") or {}).values():
            assert (out / rel).is_file(), f"{r['key']}: {rel} missing"
            named.add(rel)
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    allowed = {"manifest.jsonl", "batch_summary.json", ".ulite-dicom.lock"}
    stray = {p for p in on_disk - named - allowed if not p.startswith("shards/")}
    assert not stray, f"files no manifest row names (partial or duplicate results): {sorted(stray)}"
    assert not (out / ".tmp").exists() or not any((out / ".tmp").rglob("*")), "temporaries left behind"
    return final


def _comparable(row: dict) -> dict:
    r = {k: v for k, v in row.items() if k not in ("finished_at", "timings_s")}
    r["timing_keys"] = sorted((row.get("timings_s") or {}))
    return r


def assert_same_results(a: Path, b: Path) -> int:
    """Both output folders have the same final manifest rows (timings aside) and voxel-identical labels and SEGs;
    the number of outputs compared."""
    ra = {r["key"]: r for r in manifest_lines(a)}
    rb = {r["key"]: r for r in manifest_lines(b)}
    assert set(ra) == set(rb), set(ra) ^ set(rb)
    n = 0
    for key in ra:
        assert _comparable(ra[key]) == _comparable(rb[key]), (key, _comparable(ra[key]), _comparable(rb[key]))
        for rel in (ra[key].get("outputs") or {}).values():
            if rel.endswith((".nii.gz", ".nii")):
                ia, ib = nib.load(str(a / rel)), nib.load(str(b / rel))
                np.testing.assert_array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj))
                np.testing.assert_allclose(ia.affine, ib.affine, atol=1e-6)
            elif rel.endswith(".seg.dcm"):
                da, db = pydicom.dcmread(a / rel), pydicom.dcmread(b / rel)
                np.testing.assert_array_equal(da.pixel_array, db.pixel_array)
                refs = [{x.ReferencedSOPInstanceUID for x in d.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
                        for d in (da, db)]
                assert refs[0] == refs[1] and da.NumberOfFrames == db.NumberOfFrames
                assert [s.SegmentLabel for s in da.SegmentSequence] == [s.SegmentLabel for s in db.SegmentSequence]
            n += 1
    return n


class LoopbackRayCluster:
    """A Ray cluster of separate node processes on 127.0.0.1 (``ray.cluster_utils.Cluster``), in a private
    temporary folder; nodes are added and removed by the tests, everything is stopped by its own PIDs."""

    def __init__(self, head_cpus: int = 1) -> None:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray's first import: loopback addresses
        os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])
        self.tmp = tempfile.mkdtemp(prefix="ur")  # short: Ray's socket paths must fit 107 bytes
        os.environ["RAY_TMPDIR"] = self.tmp  # Ray's bookkeeping files (current cluster address) stay in there too
        os.makedirs(os.path.join(self.tmp, "ray"), exist_ok=True)
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": head_cpus, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "temp_dir": self.tmp, "object_store_memory": 100 * 1024 * 1024})
        self.address = self.cluster.address
        assert self.address.startswith("127.0.0.1:"), self.address

    def add_node(self, num_cpus: int = 1):
        return self.cluster.add_node(num_cpus=num_cpus, node_ip_address="127.0.0.1",
                                     object_store_memory=100 * 1024 * 1024)

    def node_pids(self, node) -> set[int]:
        """PIDs of the node's raylet and of every process under it (its workers)."""
        raylets = {p.process.pid for p in node.all_processes.get("raylet", [])}
        pids = set(raylets)
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                with_parent = d / "stat"
                try:
                    ppid = int(with_parent.read_text().split(") ", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid in raylets:
                    pids.add(int(d.name))
        return pids

    def remove_node(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)

    def shutdown(self) -> None:
        try:
            self.cluster.shutdown()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
