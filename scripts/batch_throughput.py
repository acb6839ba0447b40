# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Measure batch throughput on generated CT series (series per minute, share of wall time in the model).

Example::

    python scripts/batch_throughput.py --series 20 --shape 48 256 256 --device cpu --compare-no-prefetch
    python scripts/batch_throughput.py --series 20 --shape 40 192 192 --probe --pacs   # + PACS on loopback

Writes the series into ``--workdir`` (default: a temporary folder), runs the batch with the
bundle's inference pipeline (random weights unless ``--checkpoint``), and prints one JSON
object with the figures from ``batch_summary.json``. ``--pacs`` adds a run that pulls the same
series from a local Orthanc (DICOMweb, WADO-RS) and pushes SEG + SR to it by STOW-RS and C-STORE
(needs Debian's orthanc + orthanc-dicomweb; Orthanc runs in a loopback-only network namespace where
the machine allows one). Every run writes SEG, NIfTI, QC preview (and SR with ``--pacs``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the synthetic series writers live with the tests

from support.dicom_write import write_dicom_series  # noqa: E402
from support.phantoms import body_phantom, foreground_probe_checkpoint  # noqa: E402


def _pacs_run(opts, inp: Path, work: Path) -> dict:
    """Upload the series to a loopback Orthanc, then pull them from it and push SEG + SR back (STOW-RS, C-STORE)."""
    import contextlib

    from support.label import offline_network, offline_problem
    from support.pacs import PacsOrthanc, orthanc_problem
    from ulite_monai.batch.runner import run_batch
    from ulite_monai.io.pacs import parse_address

    problem = orthanc_problem()
    if problem:
        raise SystemExit(f"--pacs: {problem}")
    isolate = offline_network() if offline_problem() is None else contextlib.nullcontext()
    with isolate, PacsOrthanc(work / "orthanc") as pacs:
        t = time.perf_counter()
        pacs.upload(sorted(p for p in inp.rglob("*.dcm")))
        upload_s = time.perf_counter() - t
        opts.input_dir, opts.source = None, parse_address(pacs.dicomweb)
        opts.push = [parse_address(pacs.dicomweb), parse_address(pacs.dimse)]
        opts.formats = ["seg", "nifti", "qc", "sr"]
        summary = run_batch(opts)
    summary["upload_s"] = round(upload_s, 2)
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--series", type=int, default=20)
    p.add_argument("--shape", type=int, nargs=3, default=(48, 256, 256), metavar=("Z", "Y", "X"))
    p.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 2.5), metavar=("X", "Y", "Z"))
    p.add_argument("--bundle", type=Path, default=REPO / "bundles" / "ulite")
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
    p.add_argument("--pacs", action="store_true", help="also run pulling from and pushing to a loopback Orthanc")
    p.add_argument("--formats", default="seg,nifti,qc", help="outputs of the local runs (default seg,nifti,qc)")
    args = p.parse_args(argv)
    import torch

    from ulite_monai.batch.runner import BatchOptions, run_batch
    from ulite_monai.bundle import parse_overrides

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
    overrides = parse_overrides(args.set)
    runs = {}
    names = [("prefetch", True)] + ([("no_prefetch", False)] if args.compare_no_prefetch else [])
    names += [("pacs", True)] if args.pacs else []
    for name, prefetch in names:
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
            formats=args.formats.split(","),
        )
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):  # the bundle's writer prints each file it writes
            s = _pacs_run(opts, inp, work) if name == "pacs" else run_batch(opts)
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
        if name == "pacs":
            runs[name]["mean_download_s"] = round(float(np.mean([x.get("download", 0) for x in t])), 3)
            runs[name]["push_s"] = s["push_s"]
            runs[name]["upload_to_orthanc_s"] = s["upload_s"]
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
