# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""What a bundle says about its model: spatial dims, channels, keys, labels and their codes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BundleInfo", "read_metadata"]

_BACKGROUND = {"background", "bg", "_background_", "none", "other"}


def read_metadata(root: str | Path) -> dict:
    """``configs/metadata.json`` of the bundle at ``root``, with errors that name the file."""
    path = Path(root) / "configs" / "metadata.json"
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no bundle metadata at {path}; pass the bundle folder (bundles/ulite).") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"bundle metadata {path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"bundle metadata {path} is not a JSON object.")
    return meta


def _io(meta: Mapping, kind: str, default_key: str) -> tuple[str, Mapping]:
    fmt = (meta.get("network_data_format") or {}).get(kind) or {}
    if not fmt:
        return default_key, {}
    key = next(iter(fmt))
    return str(key), fmt[key] or {}


def _label_name(value: Any, number: int) -> str:
    if isinstance(value, Mapping):
        return str(value.get("label", value.get("name", f"label {number}")))
    return str(value)


@dataclass
class BundleInfo:
    """The model a bundle configuration describes (metadata.json with the config's overrides applied).

    Attributes:
        name, version, description: from metadata.json.
        spatial_dims: of the images the configuration takes: its ``input_spatial_dims`` (e.g. 3 for a 2D network
            applied slice by slice), else the configured ``network_def``'s, else metadata.json's.
        in_channels, out_channels: of the configured ``network_def`` (the config wins over metadata.json, so
            override files that make a 2D model are seen as such); ``None`` where neither says.
        image_key, pred_key: the first input and output keys of ``network_data_format``.
        channel_def: output channel index (as a string) -> name or code object, from metadata.json.
    """

    name: str
    version: str
    description: str
    spatial_dims: int | None
    in_channels: int | None
    out_channels: int | None
    image_key: str = "image"
    pred_key: str = "pred"
    channel_def: dict = field(default_factory=dict)

    @property
    def label_def(self) -> dict[int, Any]:
        """Label-map value -> name or code object, background left out.

        A softmax output (several channels) labels voxels with the channel index: ``channel_def`` as it is. A
        single sigmoid channel labels them 1: its channel 0 is the foreground.
        """
        items = {int(k): v for k, v in self.channel_def.items()}
        if self.out_channels == 1 or (len(items) == 1 and 0 in items):
            first = items.get(0, "foreground")
            return {} if _label_name(first, 1).strip().lower() in _BACKGROUND else {1: first}
        return {k: v for k, v in items.items() if k != 0 and _label_name(v, k).strip().lower() not in _BACKGROUND}

    @property
    def labels(self) -> dict[str, int]:
        """Foreground labels ``{name: label-map value}``, the names lower-case."""
        return {_label_name(v, k).strip().lower(): k for k, v in self.label_def.items()}

    def segments(self) -> list:
        """DICOM SEG segments with coded concepts (:func:`ulite_monai.io.dicom_seg.segments_from_channel_def`)."""
        from ulite_monai.io.dicom_seg import segments_from_channel_def

        label_def = {str(k): v for k, v in self.label_def.items()}
        return segments_from_channel_def(label_def, num_labels=None if label_def else 1)

    @classmethod
    def from_config(cls, meta: Mapping, parser: Any) -> BundleInfo:
        """Read from metadata ``meta`` and a :class:`monai.bundle.ConfigParser` of the config."""
        image_key, image_fmt = _io(meta, "inputs", "image")
        pred_key, pred_fmt = _io(meta, "outputs", "pred")

        def configured(ids: tuple[str, ...], fallback: Any) -> int | None:
            for i in ids:
                if i in parser:
                    return int(parser.get_parsed_content(i))
            return None if fallback is None else int(fallback)

        shape = image_fmt.get("spatial_shape")
        return cls(
            name=str(meta.get("name", "bundle")),
            version=str(meta.get("version", "0")),
            description=str(meta.get("description", "")),
            spatial_dims=configured(("input_spatial_dims", "network_def#spatial_dims", "spatial_dims"),
                                    len(shape) if shape else None),
            in_channels=configured(("network_def#in_channels", "in_channels"), image_fmt.get("num_channels")),
            out_channels=configured(("network_def#out_channels", "out_channels"), pred_fmt.get("num_channels")),
            image_key=image_key,
            pred_key=pred_key,
            channel_def={str(k): v for k, v in (pred_fmt.get("channel_def") or {}).items()},
        )
