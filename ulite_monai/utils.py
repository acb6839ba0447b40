# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Small helpers shared across the package (no heavy imports: the MONAI Label venv imports this too)."""

from __future__ import annotations

import os
import tempfile
from typing import Callable

__all__ = ["save_atomically"]


def save_atomically(save: Callable[[str], object], path: str | os.PathLike) -> str:
    """Call ``save(tmp)`` on a temp file beside ``path``, then rename it onto ``path``.

    Readers never see a half-written file; on error the temp file is removed and ``path`` is untouched.
    The temp file keeps ``path``'s suffix (e.g. ``.nii.gz``) so suffix-driven writers pick the right format.
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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
