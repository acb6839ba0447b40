# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Input checks used by the bundle's transform chains: a bad file fails early, naming the file."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["CheckChannelsd", "CheckLabelsd", "source_name"]


def source_name(data: Mapping, key: Hashable) -> str:
    """The file a (loaded) item came from, for error messages."""
    value = data.get(key)
    meta = getattr(value, "meta", None) or data.get(f"{key}_meta_dict") or {}
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    return str(name) if name else f"<{key}>"


class CheckChannelsd(MapTransform):
    """Fail with the file name when a channel-first image does not have ``num_channels`` channels.

    Args:
        keys: keys of the channel-first images to check.
        num_channels: expected number of channels (e.g. 1 for CT/MR, 3 for RGB).
        spatial_dims: if given, also check the number of spatial dimensions.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_channels: int,
        spatial_dims: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_channels = int(num_channels)
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if self.spatial_dims is not None and img.ndim - 1 != self.spatial_dims:
                raise ValueError(
                    f"{source_name(d, key)}: expected a {self.spatial_dims}D image, got array shape "
                    f"{tuple(img.shape)} (channel first). Check the file or the bundle's spatial_dims setting."
                )
            if img.shape[0] != self.num_channels:
                raise ValueError(
                    f"{source_name(d, key)}: expected {self.num_channels} channel(s), got {img.shape[0]} "
                    f"(array shape {tuple(img.shape)}, channel first). Convert the image (e.g. to grayscale) or "
                    "set in_channels to match."
                )
        return d


class CheckLabelsd(MapTransform):
    """Fail with the file name when a label map holds values outside ``{0, ..., num_classes - 1}``.

    Args:
        keys: keys of the label maps to check.
        num_classes: number of classes including background.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, num_classes: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = int(num_classes)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = torch.as_tensor(d[key])
            if lab.is_floating_point() and not torch.equal(lab, lab.round()):
                raise ValueError(
                    f"{source_name(d, key)}: label map has non-integer values; labels must be integer class "
                    f"indices 0..{self.num_classes - 1}."
                )
            lo, hi = int(lab.min()), int(lab.max())
            if lo < 0 or hi >= self.num_classes:
                values = torch.unique(lab)[:10].tolist()
                raise ValueError(
                    f"{source_name(d, key)}: label values {values} outside 0..{self.num_classes - 1} "
                    f"(num_classes={self.num_classes}). Remap the labels or change out_channels."
                )
        return d
