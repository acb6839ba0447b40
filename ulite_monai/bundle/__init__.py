# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The one way into a bundle: locate it, read its configs (with override files and ``id=value`` settings),
its metadata and its weights, and build its inference pipeline.

The bundle's JSON configs call the helpers here (``$ulite_monai.bundle.load_network(...)``); the batch CLI, the
MONAI Label app, the bench and the demo go through :class:`Bundle` and :class:`InferencePipeline`.
"""

from ulite_monai.bundle.config import Bundle, parse_overrides
from ulite_monai.bundle.helpers import (
    AtomicNibabelWriter,
    AtomicPILWriter,
    FitSlidingWindowInferer,
    atomic_writer,
    load_network,
    report_evaluation,
    report_training,
)
from ulite_monai.bundle.locate import bundle_root, locate_bundle
from ulite_monai.bundle.metadata import BundleInfo, read_metadata
from ulite_monai.bundle.metrics import (
    HD95,
    MeanSurfaceDistance,
    SpacingHausdorffDistanceMetric,
    SpacingSurfaceDistanceMetric,
)
from ulite_monai.bundle.pipeline import InferencePipeline, resolve_device
from ulite_monai.bundle.weights import CheckpointError, file_digest, load_weights, read_checkpoint, unwrap_state_dict
from ulite_monai.data.datalist import list_inputs, load_datalist

__all__ = [
    "Bundle",
    "parse_overrides",
    "bundle_root",
    "locate_bundle",
    "BundleInfo",
    "read_metadata",
    "InferencePipeline",
    "resolve_device",
    "CheckpointError",
    "file_digest",
    "load_weights",
    "read_checkpoint",
    "unwrap_state_dict",
    "load_network",
    "FitSlidingWindowInferer",
    "AtomicNibabelWriter",
    "AtomicPILWriter",
    "atomic_writer",
    "report_training",
    "report_evaluation",
    "HD95",
    "MeanSurfaceDistance",
    "SpacingHausdorffDistanceMetric",
    "SpacingSurfaceDistanceMetric",
    "load_datalist",
    "list_inputs",
]
