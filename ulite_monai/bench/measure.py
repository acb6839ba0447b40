# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Measurement primitives: timers, FLOPs, peak resident memory, and isolated child processes.

Peak memory is the resident set size (RSS) of a *fresh child process per model*: torch's CPU allocator
and oneDNN keep memory outside Python's heap, so ``tracemalloc`` misses it. On Linux the child resets
its RSS high-water mark (``/proc/self/clear_refs``) after warm-up and reads ``VmHWM`` after the measured
calls; elsewhere ``resource.getrusage().ru_maxrss`` (peak over the child's life) is used.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Sequence

import torch

__all__ = [
    "summarise", "flops_of", "param_count", "rss_mb", "reset_peak_rss", "peak_rss_mb", "trim_heap",
    "run_child", "load_average",
]


def summarise(samples_s: Sequence[float]) -> dict:
    """Median, p90, min (milliseconds) and count of a list of durations in seconds."""
    ms = sorted(1000.0 * s for s in samples_s)
    if not ms:
        return {"median_ms": None, "p90_ms": None, "min_ms": None, "n": 0}
    idx = min(len(ms) - 1, max(0, int(round(0.9 * (len(ms) - 1)))))
    return {"median_ms": statistics.median(ms), "p90_ms": ms[idx], "min_ms": ms[0], "n": len(ms)}


def param_count(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return int(sum(p.numel() for p in module.parameters()))


def flops_of(module: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``module`` on ``x``, as counted by ``torch.utils.flop_counter``.

    The counter covers matmuls, convolutions and attention (multiply and add counted separately, i.e.
    2 x MACs); element-wise ops, norms and activations are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(x)
    return int(counter.get_total_flops())


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident set size of this process in MB."""
    kb = _status_kb("VmRSS")
    if kb is None:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    return kb / 1024.0


_CAN_RESET: bool | None = None


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux); returns whether it could."""
    global _CAN_RESET
    if _CAN_RESET is False:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _CAN_RESET = _status_kb("VmHWM") is not None
    except OSError:
        _CAN_RESET = False
    return bool(_CAN_RESET)


def peak_rss_mb() -> float:
    """Peak RSS in MB since the last successful :func:`reset_peak_rss` (else over the process's life)."""
    kb = _status_kb("VmHWM") if _CAN_RESET else None
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            kb //= 1024
    return kb / 1024.0


def trim_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so a later peak is not hidden."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_child(args: list[str], timeout_s: float, max_rss_mb: float | None = None, env: dict | None = None) -> dict:
    """Run ``python -m ulite_monai.bench.probe <args>`` and return its JSON result.

    The child is killed when it runs past ``timeout_s`` or its RSS passes ``max_rss_mb``; the result is then
    ``{"status": "skipped", "reason": ...}``. A crash gives ``{"status": "error", "reason": <stderr tail>}``.
    """
    import psutil

    cmd = [sys.executable, "-m", "ulite_monai.bench.probe"] + [str(a) for a in args]
    child_env = dict(os.environ, **(env or {}))
    child_env.setdefault("PYTHONWARNINGS", "ignore")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env)
    killed: list[str] = []
    peak_seen = [0.0]

    def watch() -> None:
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                rss = p.memory_info().rss / 2**20
                peak_seen[0] = max(peak_seen[0], rss)
                if max_rss_mb is not None and rss > max_rss_mb:
                    killed.append(f"RSS passed the {max_rss_mb / 1024:.1f} GB cap (--max-rss-gb)")
                    proc.kill()
                    return
                time.sleep(0.2)
        except psutil.Error:
            return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"status": "skipped", "reason": f"ran past the {timeout_s:.0f} s cap per model (--max-model-s)"}
    watcher.join(timeout=1)
    if killed:
        return {"status": "skipped", "reason": killed[0]}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " ".join((err or "").strip().splitlines()[-3:])[-400:]
        return {"status": "error", "reason": f"child exited with {proc.returncode}: {tail}"}
    return json.loads(lines[-1])
