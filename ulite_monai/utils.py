# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Small helpers shared across the package (no heavy imports: the MONAI Label venv imports this too)."""

from __future__ import annotations

import os
import tempfile
from typing import Callable

__all__ = ["save_atomically", "save_json_atomically", "tune_cpu_allocator", "allocator_settings"]

_ALLOCATOR_TUNED: dict = {}


def save_atomically(save: Callable[[str], object], path: str | os.PathLike) -> str:
    """Call ``save(tmp)`` on a temp file beside ``path``, then rename it onto ``path``.

    Readers never see a half-written file; on error the temp file is removed and ``path`` is untouched.
    The temp file keeps ``path``'s suffix (e.g. ``.nii.gz``) so suffix-driven writers pick the right format.
    The file gets the mode a plain ``open()`` would give it (0666 less the umask), not the temp file's 0600.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    suffix = name[name.index("."):] if "." in name.lstrip(".") else ""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the fallback only)
    os.umask(mask)
    return mask


def save_json_atomically(obj, path: str | os.PathLike, indent: int | None = 2) -> str:
    """Write ``obj`` as JSON (UTF-8, flushed to disk) to ``path`` through :func:`save_atomically`."""
    import json

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    return save_atomically(write, path)


def tune_cpu_allocator(trim_threshold_mb: int = 512) -> bool:
    """Let glibc's malloc keep freed tensor memory between forward passes (CPU inference speed).

    By default glibc serves large blocks with ``mmap`` and hands them back to the kernel when freed (and
    trims the heap top), so every forward pass page-faults fresh pages in again (README.md, "CPU allocator",
    gives the measured cost). This sets ``M_MMAP_MAX=0`` (large blocks come from the heap) and
    ``M_TRIM_THRESHOLD`` (up to ``trim_threshold_mb`` of freed memory stays in the process for reuse), the effect
    that jemalloc/tcmalloc give, which PyTorch's CPU tuning guide recommends, without preloading another
    allocator. Memory freed after a peak is kept, up to the threshold at the heap top.

    Process-wide and applied once; a no-op returning False off glibc (macOS, Windows, musl) or when the
    environment variable ``ULITE_TUNE_ALLOCATOR`` is ``0``. Returns True when the settings are in force.
    """
    if "applied" in _ALLOCATOR_TUNED:
        return _ALLOCATOR_TUNED["applied"]
    applied = False
    if os.environ.get("ULITE_TUNE_ALLOCATOR", "1").strip().lower() not in ("0", "false", "no", "off"):
        try:
            libc_version = os.confstr("CS_GNU_LIBC_VERSION") or ""
        except (AttributeError, ValueError, OSError):
            libc_version = ""
        if libc_version.startswith("glibc"):
            import ctypes

            try:
                libc = ctypes.CDLL("libc.so.6")
                m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
                applied = bool(libc.mallopt(m_trim_threshold, int(trim_threshold_mb) << 20)) and bool(
                    libc.mallopt(m_mmap_max, 0)
                )
            except (OSError, AttributeError):
                applied = False
    _ALLOCATOR_TUNED["applied"] = applied
    _ALLOCATOR_TUNED["settings"] = (
        f"glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD={int(trim_threshold_mb)} MiB" if applied else "default"
    )
    return applied


def allocator_settings() -> str:
    """A line describing the CPU allocator settings in force (for benchmark reports)."""
    return _ALLOCATOR_TUNED.get("settings", "default")
