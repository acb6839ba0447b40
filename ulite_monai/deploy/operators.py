# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""MONAI Deploy operators around the batch's building blocks: the same planning, pipeline and SEG writer.

``SeriesSelectionOperator`` (DICOM folder -> work items: ``ulite_monai.batch.plan``'s discovery and the selection
rules ``ulite-dicom`` uses) -> ``BundleSegmentationOperator`` (each series through the bundle's
:class:`~ulite_monai.bundle.InferencePipeline`, loaded once, by :class:`~ulite_monai.batch.worker.SeriesWorker`:
volume, inference, DICOM SEG, manifest row) -> ``ManifestWriterOperator`` (``manifest.jsonl`` and a summary).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from monai.deploy.core import ExecutionContext, Fragment, InputContext, Operator, OperatorSpec, OutputContext

__all__ = ["SeriesSelectionOperator", "BundleSegmentationOperator", "ManifestWriterOperator"]

logger = logging.getLogger(__name__)


class SeriesSelectionOperator(Operator):
    """Discovers the DICOM series (and volume files) under a folder and selects them with the selection rules.

    Output ``plan``: ``{"todo": [WorkItem, ...], "skipped": [manifest row, ...]}`` exactly as ``ulite-dicom``
    plans the same folder (names, skip reasons, rules).

    Args:
        fragment: the application.
        input_folder: the folder to read.
        output_folder: the application's output folder (never read as input).
        rules: parsed selection rules (MONAI Deploy ``DICOMSeriesSelectorOperator`` format); ``None``: every image
            series.
        all_matched: per study and selection, every matching series (``False``: the first only).
    """

    def __init__(self, fragment: Fragment, *args, input_folder: Path, output_folder: Path, rules: dict | None = None,
                 all_matched: bool | None = None, **kwargs) -> None:
        self.input_folder, self.output_folder = Path(input_folder), Path(output_folder)
        self.rules, self.all_matched = rules, all_matched
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("plan")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        from ulite_monai.batch.manifest import Manifest
        from ulite_monai.batch.plan import plan_batch

        self.output_folder.mkdir(parents=True, exist_ok=True)
        # a one-shot application: everything selected is segmented (no resume against an earlier manifest)
        plan = plan_batch(self.input_folder, self.output_folder, Manifest(self.output_folder / "manifest.jsonl"), "",
                          self.rules, self.all_matched, overwrite=True)
        logger.info("%d series selected, %d inputs skipped", len(plan.todo), len(plan.skipped))
        op_output.emit({"todo": plan.todo, "skipped": plan.skipped}, "plan")


class BundleSegmentationOperator(Operator):
    """Segments each planned series with the bundle's inference pipeline and writes its DICOM SEG.

    The pipeline is loaded once (``start``) through :class:`~ulite_monai.bundle.Bundle`; each series goes through
    :class:`~ulite_monai.batch.worker.SeriesWorker` (series -> volume with the batch's geometry rules, the bundle's
    pre/post-processing and inferer, SEG by the batch's writer), so the SEG is the one ``ulite-dicom`` writes.

    Output ``rows``: the manifest rows (skipped inputs first, then one per series: ``done``, ``empty`` or
    ``failed`` with the reason).

    Args:
        fragment: the application.
        bundle_dir: the bundle folder (configs and metadata).
        checkpoint: the weights (``None``: the bundle config's ``ckpt_path``).
        output_folder: where ``<study UID>/<series UID>.seg.dcm`` (and the other formats) go.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        formats: outputs per series (``seg``; also ``nifti``, ``rtstruct``, ``sr``, ``qc``).
        random_weights: no checkpoint (smoke tests only).
    """

    def __init__(self, fragment: Fragment, *args, bundle_dir: Path, checkpoint: Path | None, output_folder: Path,
                 device: str = "auto", formats: tuple[str, ...] = ("seg",), random_weights: bool = False,
                 **kwargs) -> None:
        self.bundle_dir, self.checkpoint, self.output_folder = bundle_dir, checkpoint, Path(output_folder)
        self.device, self.formats, self.random_weights = device, tuple(formats), random_weights
        self.worker = None
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("plan")
        spec.output("rows")

    def start(self) -> None:
        from ulite_monai import __version__
        from ulite_monai.batch.worker import SeriesWorker
        from ulite_monai.bundle import Bundle

        self.tmp = self.output_folder / ".tmp"
        staging = self.tmp / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        pipeline = Bundle(self.bundle_dir).pipeline(device=self.device, checkpoint=self.checkpoint,
                                                    random_weights=self.random_weights, output_dir=staging, quiet=True)
        self.worker = SeriesWorker(pipeline, self.output_folder, self.tmp, staging, self.formats,
                                   software_version=f"ulite-monai {__version__} (MONAI Deploy)")
        logger.info("bundle %s loaded on %s", pipeline.model_version, pipeline.device)

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        plan = op_input.receive("plan")
        rows = [dict(r) for r in plan["skipped"]]
        for item in plan["todo"]:
            row = self.worker.run(self.worker.load(item))  # one bad series never stops the others
            if row["status"] == "failed":
                logger.warning("failed: %s: %s", item.key, row["reason"])
            rows.append(row)
        op_output.emit(rows, "rows")

    def stop(self) -> None:
        if getattr(self, "tmp", None) is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


class ManifestWriterOperator(Operator):
    """Appends the rows to ``<output>/manifest.jsonl`` (the batch's manifest format) and logs the counts."""

    def __init__(self, fragment: Fragment, *args, output_folder: Path, **kwargs) -> None:
        self.output_folder = Path(output_folder)
        self.counts: dict[str, int] = {}
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("rows")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        from ulite_monai.batch.commit import now
        from ulite_monai.batch.manifest import Manifest

        manifest = Manifest(self.output_folder / "manifest.jsonl")
        for row in op_input.receive("rows"):
            manifest.append({**row, "finished_at": now()})
            self.counts[row["status"]] = self.counts.get(row["status"], 0) + 1
        logger.info("ulite segmentation: %s", ", ".join(f"{v} {k}" for k, v in sorted(self.counts.items())))
