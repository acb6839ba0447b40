"""CPU allocator tuning: inference runs without re-faulting its memory on every forward pass."""

import json
import os
import subprocess
import sys

import pytest

_PROBE = r"""
import json, os, resource, sys
import torch
from ulite_monai.networks import ULite, inference_network
from ulite_monai.utils import allocator_settings

torch.set_num_threads(1)
net = inference_network(ULite(2, 3, 1).eval())  # tunes the allocator unless ULITE_TUNE_ALLOCATOR=0
x = torch.randn(1, 3, 256, 256)
with torch.inference_mode():
    for _ in range(3):
        net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        net(x)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"faults_per_forward": faults, "settings": allocator_settings()}))
"""


def _probe(tune: bool) -> dict:
    env = dict(os.environ, ULITE_TUNE_ALLOCATOR="1" if tune else "0")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc(), reason="the tuning is for glibc's malloc; other platforms keep their allocator")
def test_tuned_inference_reuses_memory():
    tuned = _probe(True)
    default = _probe(False)
    print(f"page faults per 1x3x256x256 forward: default {default['faults_per_forward']:.0f}, "
          f"tuned {tuned['faults_per_forward']:.0f}")
    assert "M_MMAP_MAX=0" in tuned["settings"]
    assert default["settings"] == "default"
    # a forward pass touches about 20 MB of activations: re-faulting them is thousands of faults per pass
    # (measured 3,600 to 10,000); tuned, the heap is reused (measured 0, about 100 while other jobs ran)
    assert tuned["faults_per_forward"] < 1000
    assert tuned["faults_per_forward"] * 10 < max(default["faults_per_forward"], 1000)


def test_opt_out_leaves_the_allocator_alone():
    code = ("import os; os.environ['ULITE_TUNE_ALLOCATOR'] = '0'\n"
            "from ulite_monai.utils import tune_cpu_allocator, allocator_settings\n"
            "print(tune_cpu_allocator(), tune_cpu_allocator(), allocator_settings())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "default"]


_TRAIN_PROBE = r"""
import json, sys
from ulite_monai.bundle import Bundle
from ulite_monai.utils import allocator_settings

root, extra = sys.argv[1], sys.argv[2:]
parser = Bundle(root, files=extra).parser("train")
steps = parser["initialize"]
index = [i for i, s in enumerate(steps) if "tune_cpu_allocator" in str(s)]
before = allocator_settings()
for i in index:  # only the allocator step: the others build the trainer (datasets, checkpoints)
    parser.get_parsed_content(f"initialize#{i}")
print(json.dumps({"steps": len(index), "before": before, "after": allocator_settings()}))
"""


@pytest.mark.skipif(not _glibc(), reason="the tuning is for glibc's malloc; other platforms keep their allocator")
@pytest.mark.parametrize("bundle,extra", [("ulite", []), ("ulite_2d", []), ("ulite", ["multi_gpu_train.json"])])
def test_training_configs_tune_the_allocator(bundle, extra):
    """Training re-faulted its activations on every step without it (2D paper config, 2 cores: an epoch took
    26.5 s instead of 18.1-19.8 s; docs/benchmarks/README.md, "CPU allocator")."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "bundles" / bundle
    files = [str(root / "configs" / f) for f in extra]
    out = subprocess.run([sys.executable, "-c", _TRAIN_PROBE, str(root), *files], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, ULITE_TUNE_ALLOCATOR="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["steps"] == 1
    assert got["before"] == "default"
    assert "M_MMAP_MAX=0" in got["after"]


_WORKING_SET_PROBE = r"""
import ctypes, json, os, resource, statistics
import torch
from ulite_monai.networks import ULite
from ulite_monai.utils import allocator_settings, tune_cpu_allocator

tune_cpu_allocator()
release = ctypes.CDLL("libc.so.6").malloc_trim if os.environ.get("PROBE_RELEASE") == "1" else None
torch.manual_seed(0)
net = ULite(3, 1, 2, features=(8, 16, 32, 64, 128))  # the 3D bundle's widths
opt = torch.optim.AdamW(net.parameters(), 1e-3)
x = torch.randn(2, 1, 64, 64, 64)
faults = []
for _ in range(12):  # training steps whose working set (~1 GB) is freed at the end of each step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()
    if release is not None:
        release(0)  # hand every free page back to the kernel, wherever it lies in the heap
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
print(json.dumps({"faults": faults, "settings": allocator_settings(), "peak_mb": peak_mb,
                  "steady": statistics.median(faults[-6:])}))
"""


@pytest.mark.skipif(not _glibc(), reason="the tuning is for glibc's malloc; other platforms keep their allocator")
def test_large_working_sets_are_kept_for_the_next_pass():
    """3D steps free and re-allocate GiBs: a 512 MiB bound re-faulted them on every step (a 4x1x96^3 training
    step: 55,000-330,000 faults per step; a 512x512x128 sliding window: 2.5 million faults, 13-14 s against
    9.3 s). The default keeps them, without a higher peak; a bound below the working set brings the faults back."""
    def run(env: dict) -> dict:
        base = {k: v for k, v in os.environ.items() if k != "ULITE_TRIM_THRESHOLD_MB"}
        out = subprocess.run([sys.executable, "-c", _WORKING_SET_PROBE], capture_output=True, text=True, timeout=300,
                             env=dict(base, ULITE_TUNE_ALLOCATOR="1", **env))
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    kept = run({})
    released = run({"PROBE_RELEASE": "1"})
    print(f"page faults per 2x1x64^3 training step: default {kept['faults']} (peak RSS {kept['peak_mb']} MB), "
          f"all free pages released after each step {released['faults']} (peak RSS {released['peak_mb']} MB)")
    assert "never trim" in kept["settings"]
    assert kept["faults"][0] > 20_000  # the first step faults its working set in, whatever the setting
    # later steps reuse the memory the process kept (the heap can still grow by a few MiB in one of the first
    # steps after the second, while freed blocks settle into a layout that fits every step)
    assert kept["steady"] < 1_000
    # the control: with every free page handed back after each step (malloc_trim(0)), the steps fault their working
    # set in again, so the probe does free and re-allocate it. (ULITE_TRIM_THRESHOLD_MB only trims the heap's top,
    # so what it hands back depends on what lies there when a step ends: at 0 MiB the steady steps re-faulted
    # 4,000-22,000 pages in some kernel builds and 2 in others; too layout-bound for a test.)
    assert released["steady"] > 2_000 and released["steady"] > 20 * max(kept["steady"], 1), released["faults"]
    assert kept["peak_mb"] < 1.25 * released["peak_mb"]  # keeping freed memory does not raise the peak


def test_threshold_only_goes_up_and_is_checked():
    code = ("import os, json\n"
            "from ulite_monai.utils import tune_cpu_allocator, allocator_settings\n"
            "seen = []\n"
            "for mb in (512, 256, None, 1024):\n"
            "    seen.append((tune_cpu_allocator(mb), allocator_settings()))\n"
            "errors = []\n"
            "for bad in (2048, -1):\n"
            "    try:\n"
            "        tune_cpu_allocator(bad)\n"
            "    except ValueError as e:\n"
            "        errors.append(str(e))\n"
            "os.environ['ULITE_TRIM_THRESHOLD_MB'] = 'lots'\n"
            "try:\n"
            "    tune_cpu_allocator()\n"
            "except ValueError as e:\n"
            "    errors.append(str(e))\n"
            "print(json.dumps({'seen': seen, 'errors': errors}))")
    env = dict(os.environ, ULITE_TUNE_ALLOCATOR="1")
    env.pop("ULITE_TRIM_THRESHOLD_MB", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(got["errors"]) == 3
    assert "0..2047" in got["errors"][0] and "0..2047" in got["errors"][1]
    assert "ULITE_TRIM_THRESHOLD_MB" in got["errors"][2] and "'lots'" in got["errors"][2]
    if not _glibc():
        assert all(s == [False, "default"] for s in got["seen"])
        return
    settings = [s for _, s in got["seen"]]
    assert all(ok for ok, _ in got["seen"])
    assert "512 MiB" in settings[0]
    assert "512 MiB" in settings[1]  # a lower bound asked later does not lower it
    assert "never trim" in settings[2] and "never trim" in settings[3]
