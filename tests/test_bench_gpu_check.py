# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""``scripts/gpu_check.sh``, dry run on the CPU: stages run time-boxed, results and logs land in ``$OUT``, a stage
that runs out of time is reported and makes the exit status non-zero while the others still deliver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, DEVICE="cpu", QUICK="1", OUT=str(out), PYTHON=sys.executable, STAGES="train sw", T_SW="1")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]  # the 1-second sliding-window stage ran out of time
    assert "setup    ok" in log and "train    ok" in log and "sw       TIMED OUT" in log
    assert "tests" not in log.split("=== gpu_check done")[1]  # not among STAGES
    assert (out / "gpu_check.log").read_text().count("=== [") >= 6  # the log holds every stage's start and end
    assert "no nvidia-smi" in (out / "environment.txt").read_text()
    data = json.loads((out / "benchmark.json").read_text())
    assert data["environment"]["device"] == "cpu" and "sliding_window" not in data
    names = [w["name"] for w in data["training_step"]["workloads"]]
    assert names == ["2d", "bundle"]
    assert "train 2d 2x3x32x32:" in log  # the closing summary read benchmark.json
    assert (out / "training_step.png").is_file() and (out / "benchmark.md").is_file()
