# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""``ulite-dicom --ray``: same results as the plain run, and each series committed exactly once when a worker
process is SIGKILLed mid-series, when the driver is killed and rerun, and when a node is lost.

The clusters run on 127.0.0.1 only: a private instance started by ``--ray`` itself (loopback), and a cluster of
separate node processes (``ray.cluster_utils.Cluster``) whose second node the tests add and remove. The model is
the stand-in threshold network (the outputs are known from the input); a variant marks which process is in
the middle of a series so a test can kill exactly that one.
"""

from __future__ import annotations

import json
import time

import pytest
from support.dicom import make_standin_bundle
from support.scaleout import (
    LoopbackRayCluster,
    alive,
    assert_exactly_once,
    assert_same_results,
    busy_pids,
    kill9,
    make_cohort,
    manifest_lines,
    marked_bundle,
    start_cli,
    tail,
    wait_for,
)

from ulite_monai.batch.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FLAGS = ["--random-weights", "--no-progress", "--formats", "seg,nifti,qc"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The mixed cohort and its plain single-process result (the reference every Ray run must equal)."""
    root = tmp_path_factory.mktemp("ray_cohort")
    inp = make_cohort(root)
    bundle = make_standin_bundle(root / "bundle")
    plain = root / "plain"
    assert main([str(inp), str(plain), "--bundle", str(bundle), *FLAGS]) == 1  # the damaged series fails
    keys = {r["key"] for r in manifest_lines(plain)}
    statuses = sorted(r["status"] for r in manifest_lines(plain))
    assert statuses.count("done") == 7 and "empty" in statuses and "failed" in statuses and "skipped" in statuses
    return {"root": root, "in": inp, "bundle": bundle, "plain": plain, "keys": keys}


@pytest.fixture(scope="module")
def cluster():
    c = LoopbackRayCluster(head_cpus=1)
    yield c
    c.shutdown()


@pytest.fixture
def second_node(cluster):
    node = cluster.add_node(num_cpus=1)
    yield node
    if node in cluster.cluster.worker_nodes:
        cluster.remove_node(node)


def _summary(out):
    return json.loads((out / "batch_summary.json").read_text())


def test_ray_private_instance_gives_the_plain_results(cohort, tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "log"
    proc = start_cli([cohort["in"], out, "--bundle", cohort["bundle"], *FLAGS, "--ray", "--workers", "2"], log)
    assert proc.wait(timeout=300) == 1, tail(log)  # one series fails, as in the plain run
    assert_same_results(cohort["plain"], out)
    assert_exactly_once(out, cohort["keys"])
    eng = _summary(out)["engine"]
    assert eng["address"] == "local" and eng["workers_started"] == 2 and eng["workers_lost"] == 0
    assert eng["worker_devices"] == ["cpu"] and eng["worker_nodes"] == 1


def test_worker_sigkilled_mid_series_is_retried_once(cohort, cluster, second_node, tmp_path):
    busy = tmp_path / "busy"
    bundle = marked_bundle(tmp_path / "bundle", busy, delay_s=0.6)
    out, log = tmp_path / "out", tmp_path / "log"
    proc = start_cli([cohort["in"], out, "--bundle", bundle, *FLAGS, "--ray", cluster.address, "--workers", "2"], log)
    try:
        victim = wait_for(lambda: busy_pids(busy)[:1], 240, "a worker in the middle of a series", proc, log)[0]
        kill9(victim)  # SIGKILL to the actor's process while it infers
        assert proc.wait(timeout=240) == 1, tail(log)
    finally:
        if proc.poll() is None:
            kill9(proc.pid)
    eng = _summary(out)["engine"]
    assert eng["workers_lost"] >= 1 and eng["series_retried"] >= 1, eng
    assert eng["workers_started"] >= 3  # a replacement worker was started
    assert_exactly_once(out, cohort["keys"])
    assert_same_results(cohort["plain"], out)
    assert "worker lost while segmenting" in tail(log)


def test_driver_killed_then_rerun_resumes_exactly_once(cohort, cluster, second_node, tmp_path):
    busy = tmp_path / "busy"
    bundle = marked_bundle(tmp_path / "bundle", busy, delay_s=0.6)
    out, log = tmp_path / "out", tmp_path / "log"
    args = [cohort["in"], out, "--bundle", bundle, *FLAGS, "--ray", cluster.address, "--workers", "2"]
    proc = start_cli(args, log)
    try:
        wait_for(lambda: sum(r["status"] == "done" for r in manifest_lines(out)) >= 2 and busy_pids(busy), 240,
                 "two committed series and a worker mid-series", proc, log)
        workers = busy_pids(busy)
        kill9(proc.pid)  # the driver dies mid-run
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            kill9(proc.pid)
    before = {r["key"] for r in manifest_lines(out)}
    assert 2 <= len(before) < len(cohort["keys"])
    # Ray ends the actors of a dead driver: nothing keeps writing into the output folder
    wait_for(lambda: not any(alive(p) for p in workers), 60, "the dead driver's workers to end")
    rerun_log = tmp_path / "rerun.log"
    rerun = start_cli(args, rerun_log)
    assert rerun.wait(timeout=300) == 1, tail(rerun_log)
    final = assert_exactly_once(out, cohort["keys"])
    assert_same_results(cohort["plain"], out)
    assert _summary(out)["counts"]["already_done"] >= 2
    assert all(final[k]["status"] != "failed" or "no pixel data" in final[k]["reason"] for k in final)


def test_node_lost_mid_run(cohort, cluster, second_node, tmp_path):
    busy = tmp_path / "busy"
    bundle = marked_bundle(tmp_path / "bundle", busy, delay_s=0.6)
    out, log = tmp_path / "out", tmp_path / "log"
    proc = start_cli([cohort["in"], out, "--bundle", bundle, *FLAGS, "--ray", cluster.address, "--workers", "2"], log)
    try:
        node_pids = lambda: cluster.node_pids(second_node)  # noqa: E731
        wait_for(lambda: set(busy_pids(busy)) & node_pids(), 240, "the second node's worker mid-series", proc, log)
        t = time.time()
        cluster.remove_node(second_node)  # raylet, object store and workers of that node, SIGKILL
        assert proc.wait(timeout=300) == 1, tail(log)
    finally:
        if proc.poll() is None:
            kill9(proc.pid)
    eng = _summary(out)["engine"]
    assert eng["worker_nodes"] == 2 and eng["workers_lost"] >= 1 and eng["series_retried"] >= 1, eng
    assert_exactly_once(out, cohort["keys"])
    assert_same_results(cohort["plain"], out)
    assert time.time() - t < 300
