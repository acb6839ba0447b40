# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""``--num-shards/--shard-id`` and ``ulite-dicom merge``; the commit protocol the scale-out runners share.

Unit tests: the stable split, the job-array index, each crash point of the commit protocol (journal written,
renames half done, row appended but journal left, a second result for a committed key, a dead worker's attempt
folder). Integration (slow): three shards, two at once in separate processes, into one output tree, merged:
the same results as one plain run; the locks that keep a second copy of a shard, a plain run, a merge or a
shard of another layout out; a shard SIGKILLed mid-series and rerun.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from support.dicom import make_standin_bundle
from support.scaleout import (
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
from ulite_monai.batch.commit import Committer, DuplicateResult, recover
from ulite_monai.batch.manifest import Manifest
from ulite_monai.batch.plan import WorkItem
from ulite_monai.batch.shards import Shard, ShardError, shard_from_env, shard_of

FLAGS = ["--random-weights", "--no-progress", "--formats", "seg,nifti,qc"]


# ------------------------------------------------------------------------------------------------------ the split


def test_shard_of_is_a_stable_even_partition():
    keys = [f"dicom:1.2.3.{i}/1.2.3.{i}.{j}" for i in range(200) for j in range(5)]
    # stable: fixed by the key's SHA-256, not by Python's per-process hash seed or the order of the keys
    assert [shard_of(k, 7) for k in keys[:5]] == [shard_of(k, 7) for k in reversed(keys[:5])][::-1]
    import hashlib

    assert shard_of("dicom:1.2.3/4.5.6", 16) == int(hashlib.sha256(b"dicom:1.2.3/4.5.6").hexdigest()[:16], 16) % 16
    counts = Counter(shard_of(k, 4) for k in keys)
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 0.2 * len(keys)
    shards = [Shard(4, k) for k in range(4)]
    assert all(sum(s.owns(k) for s in shards) == 1 for k in keys)  # every key in exactly one shard


def test_shard_index_from_the_job_array():
    assert shard_from_env(8, 3) == Shard(8, 3)
    assert shard_from_env(8, None, {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10"}) == Shard(8, 2)
    assert shard_from_env(8, None, {"JOB_COMPLETION_INDEX": "7"}) == Shard(8, 7)
    with pytest.raises(ShardError, match="--shard-id"):
        shard_from_env(8, None, {})
    with pytest.raises(ShardError, match="outside 0..7"):
        shard_from_env(8, 8)
    with pytest.raises(ShardError, match="1 or more"):
        shard_from_env(0, 0)


def test_cli_refuses_bad_scale_out_flags(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    base = [str(tmp_path / "in"), str(tmp_path / "out"), "--random-weights"]
    assert main([*base, "--ray", "--num-shards", "2", "--shard-id", "0"]) == 2
    assert "either --ray or --num-shards" in capsys.readouterr().err
    assert main([*base, "--num-shards", "2", "--shard-id", "5"]) == 2
    assert "outside 0..1" in capsys.readouterr().err
    assert main([*base, "--ray", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "in")]) == 2
    assert "not a ulite-dicom output folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the commit protocol


def _item(key: str, stem: str, previous=()) -> WorkItem:
    return WorkItem(key, "dicom", stem, previous_outputs=list(previous))


def _result(committer: Committer, item: WorkItem, text: str) -> tuple[dict, Path]:
    """What a worker leaves: files in a fresh attempt folder and the row naming them."""
    attempt = committer.new_attempt(item.key)
    outputs = {"nifti": f"{item.out_stem}.nii.gz", "seg": f"{item.out_stem}.seg.dcm"}
    for rel in outputs.values():
        (attempt / rel).parent.mkdir(parents=True, exist_ok=True)
        (attempt / rel).write_text(text)
    return {"key": item.key, "status": "done", "outputs": outputs, "timings_s": {"model": 0.1}}, attempt


def test_commit_makes_files_final_then_records_once(tmp_path):
    out = tmp_path / "out"
    man = Manifest(out / "manifest.jsonl")
    c = Committer(out, out / ".tmp" / "x", man)
    item = _item("dicom:s/a", "s/a", previous=["s/a.rtstruct.dcm"])
    (out / "s").mkdir(parents=True)
    (out / "s" / "a.rtstruct.dcm").write_text("old")  # an older result's output this one does not write
    row, attempt = _result(c, item, "new")
    row = c.stage(item, row, attempt)
    assert (out / "s/a.nii.gz").read_text() == "new" and not (out / "s/a.rtstruct.dcm").exists()
    assert not man.path.exists()  # final files, but no row yet: not committed
    c.record(row)
    assert [r["key"] for r in manifest_lines(out)] == ["dicom:s/a"]
    assert not attempt.exists() and not list((out / ".tmp" / "x" / "commits").iterdir())
    row2, attempt2 = _result(c, item, "late")  # a worker presumed dead finishes after all
    with pytest.raises(DuplicateResult):
        c.stage(item, row2, attempt2)
    assert not attempt2.exists() and (out / "s/a.nii.gz").read_text() == "new"


@pytest.mark.parametrize("crash", ["after_journal", "half_renamed", "after_row"])
def test_recover_rolls_an_interrupted_commit_forward(tmp_path, crash):
    out = tmp_path / "out"
    scope = out / ".tmp" / "x"
    c = Committer(out, scope, Manifest(out / "manifest.jsonl"))
    item = _item("dicom:s/b", "s/b")
    row, attempt = _result(c, item, "v1")
    if crash == "after_row":
        row = c.stage(item, row, attempt)
        c.manifest.append(row)  # the row is in, the process dies before dropping the journal
    else:
        import ulite_monai.batch.commit as commit

        real_apply = commit._apply

        def dying_apply(root, journal):  # the process dies inside the renames
            if crash == "half_renamed":
                src, dst = journal["moves"][0]
                (root / dst).parent.mkdir(parents=True, exist_ok=True)
                os.replace(root / src, root / dst)
            raise KeyboardInterrupt

        commit._apply = dying_apply
        try:
            with pytest.raises(KeyboardInterrupt):
                c.stage(item, row, attempt)
        finally:
            commit._apply = real_apply
    # the next start (a fresh manifest object, as a new process has)
    man = Manifest(out / "manifest.jsonl")
    assert recover(out, scope, man) == 1
    assert [r["key"] for r in manifest_lines(out)] == ["dicom:s/b"]  # appended once, never twice
    assert (out / "s/b.nii.gz").read_text() == "v1" and (out / "s/b.seg.dcm").read_text() == "v1"
    assert not attempt.exists() and not list((scope / "commits").glob("*.json"))
    assert recover(out, scope, Manifest(out / "manifest.jsonl")) == 0


def test_dead_workers_attempt_never_becomes_final(tmp_path):
    out = tmp_path / "out"
    scope = out / ".tmp" / "x"
    c = Committer(out, scope, Manifest(out / "manifest.jsonl"))
    attempt = c.new_attempt("dicom:s/c")
    (attempt / "s").mkdir()
    (attempt / "s" / "c.nii.gz").write_text("half")  # killed while writing: no row came back, no journal
    assert recover(out, scope, Manifest(out / "manifest.jsonl")) == 0
    assert not (out / "s").exists() and not (out / "manifest.jsonl").exists()


# ------------------------------------------------------------------------------------------ shards, end to end


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_cohort")
    inp = make_cohort(root)
    bundle = make_standin_bundle(root / "bundle")
    plain = root / "plain"
    assert main([str(inp), str(plain), "--bundle", str(bundle), *FLAGS]) == 1
    return {"root": root, "in": inp, "bundle": bundle, "plain": plain,
            "keys": {r["key"] for r in manifest_lines(plain)}}


@pytest.mark.slow
def test_three_shards_into_one_tree_then_merge_equal_one_run(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    args = [cohort["in"], out, "--bundle", cohort["bundle"], *FLAGS, "--num-shards", "3"]
    procs = [start_cli([*args, "--shard-id", str(k)], tmp_path / f"s{k}.log") for k in (0, 1)]  # at the same time
    for k, p in enumerate(procs):
        assert p.wait(timeout=300) in (0, 1), tail(tmp_path / f"s{k}.log")
    shard_rows = [r for f in sorted((out / "shards").glob("*.jsonl")) for r in
                  (json.loads(ln) for ln in f.read_text().splitlines())]
    assert all(shard_of(r["key"], 3) in (0, 1) for r in shard_rows)  # each shard wrote only its own keys
    # a merge now: shard 2 never reported
    assert main(["merge", str(out)]) == 1
    summary = json.loads((out / "batch_summary.json").read_text())
    assert summary["shards"]["missing"] == [2] and summary["shards"]["reported"] == [0, 1]
    # the last shard; the layout's locks meanwhile keep everything else out
    with Shard(3, 2).hold(out):
        capsys.readouterr()
        assert main([*map(str, args), "--shard-id", "2"]) == 2
        assert "already running" in capsys.readouterr().err
        assert main([str(cohort["in"]), str(out), "--bundle", str(cohort["bundle"]), *FLAGS]) == 2  # a plain run
        assert main([str(cohort["in"]), str(out), "--bundle", str(cohort["bundle"]), *FLAGS, "--num-shards", "4",
                     "--shard-id", "0"]) == 2
        assert "must share --num-shards" in capsys.readouterr().err
        assert main(["merge", str(out)]) == 2
        assert "still writing" in capsys.readouterr().err
    assert main([*map(str, args), "--shard-id", "2"]) in (0, 1)
    assert main(["merge", str(out)]) == 1  # every shard reported; the damaged series failed
    summary = json.loads((out / "batch_summary.json").read_text())
    assert summary["shards"]["missing"] == [] and summary["counts"]["failed"] == 1
    assert summary["counts"]["done"] == 7 and summary["keys"] == len(cohort["keys"])
    n = len(manifest_lines(out))
    assert main(["merge", str(out)]) == 1 and len(manifest_lines(out)) == n  # merging again adds nothing
    assert not list((out / "shards").glob("*.jsonl"))  # the shard manifests are in manifest.jsonl now
    assert_exactly_once(out, cohort["keys"])
    assert_same_results(cohort["plain"], out)
    # a plain rerun on the merged tree resumes: only the failed series is tried again
    assert main([str(cohort["in"]), str(out), "--bundle", str(cohort["bundle"]), *FLAGS]) == 1
    assert len(manifest_lines(out)) == n + 1


@pytest.mark.slow
def test_shard_killed_mid_series_then_rerun(cohort, tmp_path):
    busy = tmp_path / "busy"
    bundle = marked_bundle(tmp_path / "bundle", busy, delay_s=0.6)
    out = tmp_path / "out"
    # the series UIDs are random: kill the shard that owns more of the series that end done (at least 3 of 6)
    done_keys = [r["key"] for r in manifest_lines(cohort["plain"]) if r["status"] == "done"]
    k = max((0, 1), key=lambda s: sum(shard_of(key, 2) == s for key in done_keys))
    args = [cohort["in"], out, "--bundle", bundle, *FLAGS, "--num-shards", "2", "--shard-id", str(k)]
    log = tmp_path / f"s{k}.log"
    proc = start_cli(args, log)
    try:
        wait_for(lambda: busy_pids(busy) and any(r["status"] == "done" for r in manifest_lines_of_shard(out, k)),
                 240, "a committed series and the next one mid-series", proc, log)
        kill9(proc.pid)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            kill9(proc.pid)
    assert (out / ".tmp" / f"shard-{k:04d}-of-0002").exists()  # the dead shard's temporaries are still there
    assert main([*map(str, args)]) in (0, 1)  # the rerun cleans them and finishes the shard
    assert main([*map(str, args[:-1]), str(1 - k)]) in (0, 1)
    assert main(["merge", str(out)]) == 1
    assert_exactly_once(out, cohort["keys"])
    assert_same_results(cohort["plain"], out)


def manifest_lines_of_shard(out: Path, k: int) -> list[dict]:
    f = out / "shards" / f"shard-{k:04d}-of-0002.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else []
