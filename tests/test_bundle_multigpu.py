# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""multi_gpu_train.json under torchrun with 2 processes (gloo on CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.bundle import CONFIGS, REPO
from ulite_monai.data.demo import generate_demo_dataset


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_two_processes_gloo(tmp_path):
    data = tmp_path / "data"
    generate_demo_dataset(data, num_train=2, num_val=2, num_test=0)
    out = tmp_path / "out"
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
        "-m", "monai.bundle", "run", "training",
        "--config_file", configs,
        "--meta_file", str(CONFIGS / "metadata.json"),
        "--logging_file", str(CONFIGS / "logging.conf"),
        "--dataset_dir", str(data), "--ckpt_dir", str(out / "models"), "--log_dir", str(out / "runs"),
        "--max_epochs", "1", "--val_interval", "1", "--features", "[4,8,16]", "--pixdim", "[4.0,4.0,4.0]",
        "--patch_size", "[32,32,32]", "--roi_size", "[32,32,32]", "--num_samples", "1", "--batch_size", "1",
        "--progress_bar", "False",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # "--master_port=0" makes torchrun's static rendezvous hang: pick a free port instead
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("ulite training done") == 1  # only rank 0 reports
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # saved without the DDP wrapper
    assert len(list(Path(out / "models").glob("last_checkpoint_epoch=*.pt"))) == 1
