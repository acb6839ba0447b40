# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The ulite segmentation as a MONAI Deploy application: DICOM in, series selection, the bundle's inference, SEG out.

Run locally (``pip install 'ulite-monai[deploy]'``)::

    python -m ulite_monai.deploy -i /data/dicom -o /data/out -m bundles/ulite/models/model.pt

or as a MAP (``monai-deploy run ulite-seg-x64-workstation-dgpu-linux-amd64:0.1.0 -i /data/dicom -o /data/out``).
Input, output and model follow the MONAI Deploy conventions: ``-i/-o/-m`` or ``HOLOSCAN_INPUT_PATH``,
``HOLOSCAN_OUTPUT_PATH``, ``HOLOSCAN_MODEL_PATH`` (a checkpoint file, or a folder holding one ``*.pt``/``*.pth``).
Settings of this application (environment, as a MAP takes them):

* ``ULITE_BUNDLE``: the bundle folder (default: ``bundle/`` next to this file in a MAP, else ``bundles/ulite``);
* ``ULITE_RULES``: selection rules file, or ``all`` (default: the bundled ``series_selection.json``, the rules
  ``ulite-dicom`` uses);
* ``ULITE_DEVICE``: ``auto`` (default), ``cpu``, ``cuda``; ``ULITE_FORMATS``: ``seg`` (default) or a list such as
  ``seg,nifti,sr``; ``ULITE_RANDOM_WEIGHTS=1``: no checkpoint (smoke tests only).

Outputs: ``<output>/<StudyInstanceUID>/<SeriesInstanceUID>.seg.dcm`` per series with a segmentation, and
``<output>/manifest.jsonl`` (one row per series or skipped input, the batch's format).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Current stack size", category=RuntimeWarning)  # holoscan, on import

from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import Application  # noqa: E402

from ulite_monai.deploy.operators import (  # noqa: E402
    BundleSegmentationOperator,
    ManifestWriterOperator,
    SeriesSelectionOperator,
)

__all__ = ["ULiteSegmentationApp", "main", "resolve_checkpoint", "resolve_bundle", "resolve_rules"]

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parents[1]


def resolve_bundle() -> Path:
    """``$ULITE_BUNDLE``, else ``bundle/`` beside this file (the MAP's app folder), else the repository's bundle."""
    from ulite_monai.bundle import locate_bundle

    if os.environ.get("ULITE_BUNDLE"):
        return locate_bundle(os.environ["ULITE_BUNDLE"])
    for c in (_HERE / "bundle", Path.cwd() / "bundle"):
        if (c / "configs" / "metadata.json").is_file():
            return c
    return locate_bundle()


def resolve_rules() -> dict | None:
    """The selection rules: ``$ULITE_RULES`` (``all`` = every image series), else the project's default file."""
    from ulite_monai.io.series_selection import load_selection_rules

    value = os.environ.get("ULITE_RULES", "")
    if value == "all":
        return None
    for c in ([Path(value)] if value else []) + [_HERE / "series_selection.json", _REPO / "configs" /
                                                   "series_selection.json"]:
        if c.is_file():
            return load_selection_rules(c)
    raise FileNotFoundError(f"selection rules not found ({value or 'series_selection.json'}); set ULITE_RULES")


def resolve_checkpoint(model_path: str | os.PathLike | None) -> Path | None:
    """The checkpoint from the model path of the app context: a file, or the one ``*.pt``/``*.pth`` under a
    folder (a MAP holds ``/opt/holoscan/models/<name>/<file>``); ``None`` when no model path is set or it is the
    SDK's default ``models`` folder and that does not exist (the bundle config's ``ckpt_path`` then)."""
    if not model_path:
        return None
    p = Path(model_path)
    if p.is_file():
        return p
    if not p.is_dir():
        return None
    found = sorted(q for q in p.rglob("*") if q.suffix in (".pt", ".pth") and q.is_file())
    if len(found) > 1:
        raise ValueError(f"several checkpoints under {p}: {[str(q) for q in found]}; give one file with -m")
    return found[0] if found else None


class ULiteSegmentationApp(Application):
    """DICOM folder -> series selection (the batch's rules) -> the bundle's inference -> DICOM SEG + manifest."""

    def compose(self) -> None:
        ctx = Application.init_app_context(self.argv)  # -i/-o/-m or HOLOSCAN_INPUT_PATH/OUTPUT_PATH/MODEL_PATH
        if logging.getLogger().level > logging.DEBUG:  # the SDK's logging config shows every highdicom step
            logging.getLogger("highdicom").setLevel(logging.WARNING)
        inp, out = Path(ctx.input_path), Path(ctx.output_path)
        random_weights = os.environ.get("ULITE_RANDOM_WEIGHTS", "") in ("1", "true", "yes")
        ckpt = None if random_weights else resolve_checkpoint(ctx.model_path)
        formats = tuple(f.strip() for f in os.environ.get("ULITE_FORMATS", "seg").split(",") if f.strip())
        select = SeriesSelectionOperator(self, CountCondition(self, 1), name="series_selection", input_folder=inp,
                                         output_folder=out, rules=resolve_rules())
        segment = BundleSegmentationOperator(self, name="bundle_segmentation", bundle_dir=resolve_bundle(),
                                             checkpoint=ckpt, output_folder=out,
                                             device=os.environ.get("ULITE_DEVICE", "auto"), formats=formats,
                                             random_weights=random_weights)
        report = ManifestWriterOperator(self, name="manifest_writer", output_folder=out)
        self.add_flow(select, segment, {("plan", "plan")})
        self.add_flow(segment, report, {("rows", "rows")})
        logging.info("ulite app: %s -> %s (model %s)", inp, out, ckpt or "bundle default")


def main() -> None:
    logging.getLogger("monai.data.image_writer").setLevel(logging.WARNING)
    ULiteSegmentationApp().run()


if __name__ == "__main__":
    main()
