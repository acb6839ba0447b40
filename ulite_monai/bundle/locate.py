# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Where the bundle is: an explicit folder, the current directory, or the copy beside the package."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["bundle_root", "locate_bundle", "REPO_BUNDLE"]

#: the bundle of this source tree (editable installs and the repository itself)
REPO_BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "ulite"


def _is_bundle(folder: Path) -> bool:
    return (folder / "configs" / "metadata.json").is_file()


def locate_bundle(path: str | os.PathLike | None = None, name: str = "ulite") -> Path:
    """The bundle folder (the one holding ``configs/metadata.json``), as an absolute path.

    Args:
        path: a bundle folder, or a file inside its ``configs/`` folder. ``None`` searches, first match wins:
            ``$ULITE_BUNDLE`` (for the default ``name``); ``bundles/<name>`` under the current directory (the
            repository root); the current directory when it is the bundle's folder (named ``<name>``); ``bundles/<name>``
            beside the installed package.
        name: which of the project's bundles to look for: ``ulite`` (3D) or ``ulite_2d``.

    Raises:
        FileNotFoundError: nothing found; the message says what to pass.
    """
    if path is not None and str(path) != "":
        p = Path(path).expanduser()
        if p.is_file() and p.parent.name == "configs":
            p = p.parent.parent
        if not _is_bundle(p):
            raise FileNotFoundError(
                f"no MONAI bundle at {p} (expected {p / 'configs' / 'metadata.json'}); pass the bundle folder, "
                "e.g. bundles/ulite."
            )
        return p.resolve()
    env = os.environ.get("ULITE_BUNDLE") if name == "ulite" else None
    here = [Path(".")] if Path.cwd().name == name else []  # run from inside the bundle's own folder
    candidates = ([Path(env)] if env else []) + [Path("bundles") / name, *here, REPO_BUNDLE.parent / name]
    for c in candidates:
        if _is_bundle(c):
            return c.resolve()
    raise FileNotFoundError(
        f"cannot find the {name} bundle from the current directory; run from the repository root, set ULITE_BUNDLE, "
        f"or pass the bundle folder (--bundle_root / --bundle <path/to/bundles/{name}>)."
    )


def bundle_root(name: str = "ulite") -> str:
    """:func:`locate_bundle` as a string, for the configs' ``bundle_root`` (``--bundle_root`` overrides it)."""
    root = locate_bundle(name=name)
    try:  # a relative path when the bundle is under the current directory: outputs stay readable in logs
        return str(root.relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(root)
