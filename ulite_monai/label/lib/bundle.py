"""The ``ulite`` bundle as the MONAI Label app sees it.

The Label app runs the bundle's own pipeline: this module reads
``bundles/ulite/configs/{inference,train}.json`` (plus optional override
files, e.g. the 2D paper setup) through MONAI's :class:`ConfigParser` and
answers the questions MONAI Label asks: which labels, 2D or 3D, which keys.
No transform is written here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

__all__ = ["BundleSource", "default_bundle_dir", "split_paths"]


def default_bundle_dir() -> Path:
    """``bundles/ulite`` of the source tree this package was imported from (editable install)."""
    return Path(__file__).resolve().parents[3] / "bundles" / "ulite"


def split_paths(value: str | Sequence[str] | None) -> list[str]:
    """Comma-separated string (as passed with ``--conf configs a.json,b.json``) or list -> list of paths."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(i).strip() for i in items if str(i).strip()]


class BundleSource:
    """The bundle folder, the override files merged onto its configs, and its metadata.

    Args:
        bundle_dir: folder with ``configs/metadata.json``, ``configs/inference.json``, ``configs/train.json``.
        overrides: config files merged (in order) after the bundle's own config, e.g.
            ``configs/ulite_2d_paper.json``; keys there replace the bundle's.
    """

    def __init__(self, bundle_dir: str | os.PathLike | None = None, overrides: Sequence[str] | str | None = None):
        self.bundle_dir = Path(bundle_dir).expanduser().resolve() if bundle_dir else default_bundle_dir()
        self.overrides = [str(Path(p).expanduser().resolve()) for p in split_paths(overrides)]
        meta = self.bundle_dir / "configs" / "metadata.json"
        if not meta.is_file():
            raise FileNotFoundError(
                f"No MONAI bundle at {self.bundle_dir} (missing configs/metadata.json). "
                "Pass the bundle folder with `--conf bundle /path/to/bundles/ulite`."
            )
        for p in self.overrides:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"Config override {p} (from `--conf configs ...`) does not exist.")
        with open(meta) as f:
            self.metadata: dict[str, Any] = json.load(f)

    @property
    def meta_file(self) -> str:
        return str(self.bundle_dir / "configs" / "metadata.json")

    def config_files(self, name: str) -> list[str]:
        """The bundle's ``{name}.json`` followed by the override files."""
        main = self.bundle_dir / "configs" / f"{name}.json"
        if not main.is_file():
            raise FileNotFoundError(f"The bundle at {self.bundle_dir} has no configs/{name}.json.")
        return [str(main), *self.overrides]

    def parser(self, name: str, **extra: Any) -> ConfigParser:
        """A :class:`ConfigParser` of ``{name}.json`` + overrides, with ``bundle_root`` set and ``extra`` applied."""
        parser = ConfigParser()
        parser.read_meta(self.meta_file)
        parser.read_config(self.config_files(name))
        parser["bundle_root"] = str(self.bundle_dir)
        for k, v in extra.items():
            parser[k] = v
        return parser

    # --- what MONAI Label needs to know -------------------------------------------------------------------------
    def _io(self, kind: str) -> tuple[str, dict]:
        fmt = self.metadata.get("network_data_format", {}).get(kind, {})
        if not fmt:
            return ("image" if kind == "inputs" else "pred"), {}
        key = next(iter(fmt))
        return key, fmt[key]

    @property
    def image_key(self) -> str:
        return self._io("inputs")[0]

    @property
    def pred_key(self) -> str:
        return self._io("outputs")[0]

    @property
    def labels(self) -> dict[str, int]:
        """Foreground labels ``{name: value}`` from the output ``channel_def`` (background left out)."""
        channel_def = self._io("outputs")[1].get("channel_def", {})
        labels = {str(v).lower(): int(k) for k, v in channel_def.items() if str(v).lower() != "background"}
        if not labels:
            raise ValueError(f"{self.meta_file}: network_data_format.outputs has no foreground channel_def.")
        return labels

    def spatial_dims(self, parser: ConfigParser) -> int:
        """2 or 3: ``network_def#spatial_dims`` of the parsed config (overrides included)."""
        for key in ("network_def#spatial_dims", "spatial_dims"):
            if key in parser:
                value = parser.get_parsed_content(key)
                return int(value)
        shape = self._io("inputs")[1].get("spatial_shape")
        return len(shape) if shape else 3

    @property
    def description(self) -> str:
        return str(self.metadata.get("description", "U-Lite segmentation"))

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", ""))
