# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Measure batch throughput on generated CT series (series per minute, share of wall time in the model).

Example::

    python -m ulite_monai.batch.throughput --series 20 --shape 48 256 256 --device cpu --compare-no-prefetch

Writes the series into ``--workdir`` (default: a temporary folder), runs the batch with the
bundle's inference pipeline (random weights unless ``--checkpoint``), and prints one JSON
object with the figures from ``batch_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ulite_monai.io.dicom_write import write_dicom_series


def body_phantom(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A CT-like volume [z, y, x] in HU: air, an elliptic body (soft tissue), a few dense blobs, noise."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.ogrid[:nz, :ny, :nx]
    body = ((y - ny / 2) / (0.42 * ny)) ** 2 + ((x - nx / 2) / (0.47 * nx)) ** 2 < 1
    vol = np.broadcast_to(np.where(body, 40, -1000), shape).astype(np.float32)
    for _ in range(4):
        c = rng.uniform([0.2 * nz, 0.3 * ny, 0.3 * nx], [0.8 * nz, 0.7 * ny, 0.7 * nx])
        r = rng.uniform(0.05, 0.12) * nx
        blob = ((z - c[0]) * 2.0) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < r**2
        vol[blob] = rng.uniform(60, 250)
    vol += rng.normal(0, 15, shape).astype(np.float32)
    return np.clip(np.round(vol), -1024, 3000).astype(np.int16)


def foreground_probe_checkpoint(bundle: Path, path: Path) -> Path:
    """Weights for the bundle's ``network_def`` whose output bias says "foreground" everywhere.

    Through the bundle pipeline this labels the CropForegroundd box of each input: a geometry
    and output-path probe (SEG frames get written), not a segmentation model.
    """
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(bundle) / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network_def")
    state = net.state_dict()
    n_out = int(parser["out_channels"])
    key = [k for k, v in state.items() if k.endswith("bias") and tuple(v.shape) == (n_out,)][-1]
    state[key] = torch.tensor([-30.0] + [30.0] * (n_out - 1))
    torch.save(state, path)
    return Path(path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--series", type=int, default=20)
    p.add_argument("--shape", type=int, nargs=3, default=(48, 256, 256), metavar=("Z", "Y", "X"))
    p.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 2.5), metavar=("X", "Y", "Z"))
    p.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parents[2] / "bundles" / "ulite")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument(
        "--probe",
        action="store_true",
        help="foreground-probe weights (every series gets a SEG written) instead of random weights",
    )
    p.add_argument("--set", action="append", default=[], metavar="ID=JSON", help="bundle config override")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--compare-no-prefetch", action="store_true", help="also run without read-ahead")
    p.add_argument("--keep", action="store_true", help="keep the generated series and outputs")
    args = p.parse_args(argv)
    import torch

    from ulite_monai.batch.runner import BatchOptions, run_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ulite-throughput-"))
    inp = work / "in"
    t0 = time.perf_counter()
    for i in range(args.series):
        write_dicom_series(
            body_phantom(tuple(args.shape), seed=i),
            inp / f"series_{i:03d}",
            origin=(-0.5 * args.shape[2] * args.spacing[0], -0.5 * args.shape[1] * args.spacing[1], -300.0 + i),
            spacing=args.spacing,
            rescale=(1.0, -1024.0),
            series_number=i + 1,
        )
    gen_s = time.perf_counter() - t0
    checkpoint = args.checkpoint
    if checkpoint is None and args.probe:
        checkpoint = foreground_probe_checkpoint(args.bundle, work / "probe.pt")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    runs = {}
    for name, prefetch in [("prefetch", True)] + ([("no_prefetch", False)] if args.compare_no_prefetch else []):
        out = work / f"out_{name}"
        shutil.rmtree(out, ignore_errors=True)
        opts = BatchOptions(
            input_dir=inp,
            output_dir=out,
            bundle_dir=args.bundle,
            rules=None,
            device=args.device,
            checkpoint=checkpoint,
            allow_random_weights=checkpoint is None,
            overrides=overrides,
            prefetch=prefetch,
            progress=True,
        )
        s = run_batch(opts)
        rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
        t = [r["timings_s"] for r in rows if "timings_s" in r]
        runs[name] = {
            "series_per_minute": s["series_per_minute"],
            "model_fraction_of_wall": s["model_fraction_of_loop"],
            "loop_s": s["loop_s"],
            "model_s": s["model_s"],
            "waiting_for_reader_s": s["waiting_for_reader_s"],
            "mean_read_s": round(float(np.mean([x["read"] for x in t])), 3),
            "mean_preprocess_s": round(float(np.mean([x["preprocess"] for x in t])), 3),
            "mean_model_s": round(float(np.mean([x["model"] for x in t])), 3),
            "mean_postprocess_s": round(float(np.mean([x["postprocess"] for x in t])), 3),
            "mean_write_s": round(float(np.mean([x["write"] for x in t])), 3),
            "statuses": s["counts"],
            "device": s["device"],
        }
    result = {
        "series": args.series,
        "shape_zyx": list(args.shape),
        "spacing_xyz_mm": list(args.spacing),
        "torch_threads": torch.get_num_threads(),
        "weights": "checkpoint" if args.checkpoint else ("foreground probe" if args.probe else "random"),
        "generate_s": round(gen_s, 2),
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
