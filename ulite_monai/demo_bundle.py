# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""End-to-end demo of the ``ulite`` bundle: train on the embedded demo data, infer on one demo volume.

Equivalent to::

    python -m monai.bundle run training --config_file bundles/ulite/configs/train.json \\
        --meta_file bundles/ulite/configs/metadata.json --logging_file bundles/ulite/configs/logging.conf
    python -m monai.bundle run --config_file bundles/ulite/configs/inference.json \\
        --meta_file bundles/ulite/configs/metadata.json --input <demo volume>

Usage::

    python -m ulite_monai.demo_bundle [--bundle_root bundles/ulite] [--max_epochs N] [--skip_training]

Prints the best validation Dice, the checkpoint, the input volume and the output label path.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; return ``{"val_dice", "train_seconds", "model", "input", "output"}``."""
    from ulite_monai.bundle import Bundle, load_datalist

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle_root", default=None, help="bundle folder (default: found from the current directory)")
    ap.add_argument("--max_epochs", type=int, default=None, help="override the training budget")
    ap.add_argument("--skip_training", action="store_true", help="reuse models/model.pt")
    args = ap.parse_args(argv)

    bundle = Bundle(args.bundle_root)
    result: dict = {"val_dice": None, "train_seconds": None}
    if not args.skip_training:
        budget = {}
        if args.max_epochs:
            budget = {"max_epochs": args.max_epochs, "val_interval": min(args.max_epochs, 5)}  # validate at least once
        wf = bundle.workflow("train", "train", **budget)
        wf.initialize()
        t0 = time.perf_counter()
        wf.run()
        result["train_seconds"] = round(time.perf_counter() - t0, 1)
        evaluator = wf.parser.get_parsed_content("validate#evaluator")
        result["val_dice"] = None if evaluator.state.best_metric_epoch < 0 else float(evaluator.state.best_metric)
        result["best_epoch"] = int(evaluator.state.best_metric_epoch)
        wf.finalize()
    result["model"] = str(bundle.root / "models" / "model.pt")

    parser = bundle.parser("inference")
    dataset_dir, demo = parser.get_parsed_content("dataset_dir"), parser.get_parsed_content("demo_data")
    demo_input = load_datalist(dataset_dir, "testing", demo=demo)[0]["image"]
    wf = bundle.workflow("inference", "infer", input=demo_input)
    wf.initialize()
    wf.run()
    wf.finalize()
    out_dir = Path(wf.parser.get_parsed_content("output_dir"))
    name = Path(demo_input).name.replace(".nii.gz", "").replace(".nii", "")
    result["input"] = demo_input
    result["output"] = str(out_dir / f"{name}_{wf.parser['output_postfix']}.nii.gz")
    if result["val_dice"] is not None:
        print(f"val Dice (best): {result['val_dice']:.4f} at epoch {result['best_epoch']}, "
              f"training took {result['train_seconds']} s")
    print(f"model:  {result['model']}")
    print(f"input:  {result['input']}")
    print(f"output: {result['output']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
