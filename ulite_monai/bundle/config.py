# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The bundle's configs, read the way ``python -m monai.bundle run`` reads them.

A :class:`Bundle` is a bundle folder plus what a user layers on top: override config files merged after the
bundle's own config (``--config_file "['inference.json', 'override.json']"``) and ``id=value`` settings
(``--id value``). Every door (the batch CLI, the MONAI Label app, the bench, the demo) reads configs, metadata
and weights through it; this module is the only place that makes a ``ConfigParser``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ulite_monai.bundle.locate import locate_bundle
from ulite_monai.bundle.metadata import BundleInfo, read_metadata

__all__ = ["Bundle", "parse_overrides"]


def parse_overrides(items: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """Config settings as a dict, from a mapping or from ``"id=value"`` strings (``--set`` style).

    A value is read as JSON when it parses (``2``, ``[64, 64]``, ``true``, ``null``, ``"text"``), else kept as
    the string (``$@bundle_root + '/x'``, ``cuda:0``). Ids use ``#`` for nesting (``inferer#sw_batch_size=4``).

    Raises:
        ValueError: an item without ``=`` or with an empty id.
    """
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config override {item!r} is not of the form ID=VALUE (e.g. inferer#sw_batch_size=4).")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _split_paths(value: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[Path]:
    if not value:
        return []
    items = str(value).split(",") if isinstance(value, (str, os.PathLike)) else list(value)
    return [Path(str(i).strip()).expanduser() for i in items if str(i).strip()]


class Bundle:
    """A bundle folder with the override files and settings layered on its configs.

    Args:
        root: the bundle folder (default: :func:`~ulite_monai.bundle.locate_bundle` searches).
        files: config files merged, in order, after the bundle's own config (list, or comma-separated string as
            MONAI Label's ``--conf configs a.json,b.json`` passes them).
        overrides: ``{id: value}`` or ``["id=value", ...]`` applied last (see :func:`parse_overrides`).

    Raises:
        FileNotFoundError: no bundle, or a missing override file (named).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        files: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
        overrides: Mapping[str, Any] | Iterable[str] | None = None,
    ) -> None:
        self.root = locate_bundle(root)
        self.files = [p.resolve() for p in _split_paths(files)]
        for p in self.files:
            if not p.is_file():
                raise FileNotFoundError(f"config override file {p} does not exist.")
        self.overrides = parse_overrides(overrides)
        self.metadata = read_metadata(self.root)

    def __repr__(self) -> str:
        return f"Bundle({str(self.root)!r}, files={[str(f) for f in self.files]}, overrides={self.overrides})"

    @property
    def meta_file(self) -> str:
        return str(self.root / "configs" / "metadata.json")

    @property
    def logging_file(self) -> str | None:
        f = self.root / "configs" / "logging.conf"
        return str(f) if f.is_file() else None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", self.root.name))

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "0"))

    def config_files(self, name: str = "inference") -> list[str]:
        """The bundle's ``configs/<name>.json`` followed by the override files.

        Raises:
            FileNotFoundError: the bundle has no such config.
        """
        main = self.root / "configs" / f"{name}.json"
        if not main.is_file():
            raise FileNotFoundError(f"the bundle at {self.root} has no configs/{name}.json.")
        return [str(main), *(str(f) for f in self.files)]

    def settings(self, **extra: Any) -> dict[str, Any]:
        """``bundle_root``, then this bundle's overrides, then ``extra``: what is set on every parser."""
        return {"bundle_root": str(self.root), **self.overrides, **extra}

    def parser(self, name: str = "inference", **extra: Any):
        """A :class:`monai.bundle.ConfigParser` of ``configs/<name>.json`` + override files, with the metadata read
        and :meth:`settings` applied (``extra`` last)."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_meta(self.meta_file)
        parser.read_config(self.config_files(name))
        for k, v in self.settings(**extra).items():
            parser[k] = v
        return parser

    def workflow(self, name: str, workflow_type: str, **extra: Any):
        """A :class:`monai.bundle.ConfigWorkflow` of ``configs/<name>.json`` (``workflow_type``: ``"train"`` or
        ``"infer"``), as ``python -m monai.bundle run`` builds it, with :meth:`settings` applied."""
        from monai.bundle import ConfigWorkflow

        kwargs: dict[str, Any] = {"meta_file": self.meta_file}
        if self.logging_file:
            kwargs["logging_file"] = self.logging_file
        wf = ConfigWorkflow(config_file=self.config_files(name), workflow_type=workflow_type, **kwargs)
        for k, v in self.settings(**extra).items():  # set on the parser: ids with '#' work as well
            wf.parser[k] = v
        return wf

    def info(self, parser: Any = None, name: str = "inference") -> BundleInfo:
        """Spatial dims, channels, keys and labels of the configured model (``parser`` or a fresh one)."""
        return BundleInfo.from_config(self.metadata, parser if parser is not None else self.parser(name))

    def pipeline(self, **kwargs: Any):
        """The inference pipeline of this bundle (:class:`~ulite_monai.bundle.InferencePipeline`)."""
        from ulite_monai.bundle.pipeline import InferencePipeline

        return InferencePipeline(self, **kwargs)
