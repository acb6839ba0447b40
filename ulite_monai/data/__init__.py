# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Embedded demo datasets (3D synthetic CT-like, 2D ISIC-style), dataset layouts and input checks."""

from ulite_monai.data.datalist import list_inputs, load_datalist
from ulite_monai.data.demo import ensure_demo_dataset, generate_demo_dataset, make_demo_case
from ulite_monai.data.isic import generate_isic_demo, is_isic_folder, isic_pairs, isic_split
from ulite_monai.data.transforms import CheckChannelsd, CheckLabelsd

__all__ = [
    "load_datalist",
    "list_inputs",
    "ensure_demo_dataset",
    "generate_demo_dataset",
    "make_demo_case",
    "generate_isic_demo",
    "is_isic_folder",
    "isic_pairs",
    "isic_split",
    "CheckChannelsd",
    "CheckLabelsd",
]
