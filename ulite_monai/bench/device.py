# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Where the benchmark runs: the device, mixed precision, timers and memory readings for CPU and CUDA.

On the CPU a call is timed with ``time.perf_counter``. On CUDA work is asynchronous: the timer synchronises the
device, records a CUDA event, runs the call, records a second event and waits for it, and reports the time
between the events (the device timeline of the call, launch gaps included). Peak memory on CUDA is
``torch.cuda.max_memory_allocated`` (what tensors hold; the caching allocator's reserve and the CUDA context are
not counted), taken after ``torch.cuda.reset_peak_memory_stats``.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from typing import Callable

import torch

__all__ = [
    "AMP_DTYPES",
    "resolve",
    "check_amp",
    "autocast",
    "grad_scaler",
    "synchronize",
    "Timer",
    "gpu_allocated_mb",
    "reset_gpu_peak",
    "gpu_peak_mb",
    "cuda_environment",
]

#: ``--amp`` choices and the autocast dtype each one means (``none``: float32)
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve(device: str | torch.device | None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available) as a ``torch.device``.

    Raises:
        ValueError: CUDA asked for but not available (the message says to use ``--device cpu``).
    """
    from ulite_monai.bundle.pipeline import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def check_amp(device: torch.device, amp: str | None) -> str:
    """The ``--amp`` setting, checked against the device.

    Raises:
        ValueError: an unknown setting, or mixed precision asked for on the CPU (the bundle autocasts on CUDA
            only, and the CPU's float16/bfloat16 convolutions are many times slower than float32 ones).
    """
    amp = (amp or "none").lower()
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown --amp {amp!r}; choose from {', '.join(AMP_DTYPES)}.")
    if amp != "none" and device.type != "cuda":
        raise ValueError(f"--amp {amp} needs --device cuda (mixed precision is benchmarked on CUDA only); "
                         "use --amp none on the CPU.")
    return amp


def autocast(device: torch.device, amp: str | None):
    """``torch.autocast`` for ``amp`` (``fp16``/``bf16``) on ``device``; a null context for ``none``."""
    dtype = AMP_DTYPES[(amp or "none").lower()]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: str | None) -> torch.amp.GradScaler:
    """A ``GradScaler`` enabled for float16 autocast (as MONAI's ``SupervisedTrainer`` uses with ``amp``);
    disabled (a pass-through) for float32 and bfloat16."""
    return torch.amp.GradScaler(device.type, enabled=(amp or "none").lower() == "fp16")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Seconds taken by one call of a function on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        torch.cuda.synchronize(self.device)
        self._start.record()
        fn()
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1000.0


def gpu_allocated_mb(device: torch.device) -> float:
    """Memory held by tensors on ``device`` now (MB; 0 on the CPU)."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def reset_gpu_peak(device: torch.device) -> None:
    """Synchronise, then restart the peak-memory counter of ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mb(device: torch.device) -> float:
    """Peak memory held by tensors on ``device`` since :func:`reset_gpu_peak` (MB; 0 on the CPU)."""
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def cuda_environment(device: torch.device) -> dict:
    """The GPU and its software stack: name, memory, compute capability, driver, CUDA, cuDNN, math settings."""
    props = torch.cuda.get_device_properties(device)
    return {
        "gpu": props.name,
        "gpu_memory_gb": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "gpu_count": torch.cuda.device_count(),
        "driver": _driver_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "tf32_matmul": _flag(lambda: torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": _flag(lambda: torch.backends.cudnn.allow_tf32),
    }


def _flag(read: Callable[[], object]) -> bool | None:
    """A backend setting, or ``None`` where this torch no longer has it."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(read())
    except (AttributeError, RuntimeError):
        return None
