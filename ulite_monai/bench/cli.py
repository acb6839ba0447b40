# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""``python -m ulite_monai.bench`` / ``ulite-bench``: U-Lite against MONAI's segmentation networks.

Modes (``--modes``, default ``speed``):

- ``speed``: parameters, FLOPs, latency (bs1 median/p90), throughput (2D; bs8 on the CPU, bs32 on CUDA),
  training step and peak memory in 2D (1x3x256x256) and 3D (1x1x128x128x128);
- ``sw``: sliding-window inference of a 512x512x128 volume with the bundle's inferer settings (and a
  sweep around them): time and peak memory;
- ``train``: training steps (forward, backward, optimiser) of U-Lite and MONAI UNet side by side: 3D 4x1x96^3
  at the bundle's widths, 2D 8x3x256x256 at the paper's, and the bundle's own step;
- ``quality``: U-Lite and MONAI UNet trained for the same time on the bundle's data; validation Dice through
  the bundle's inference pipeline.

``--device cuda`` (or ``auto``) runs the same tables on a GPU, ``--amp fp16|bf16`` under autocast. The bundle
(``--bundle``, ``--config-override``, ``--set``) is read through :class:`ulite_monai.bundle.Bundle`.
Writes ``benchmark.json``, ``benchmark.md``, ``latency_vs_params.png`` (speed) and ``training_step.png`` (train)
into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]

_QUICK_MODELS = ("ulite", "ulite-default", "ulite-fused", "ulite-onnx", "monai-unet")


def build_parser() -> argparse.ArgumentParser:
    from ulite_monai.bench.device import AMP_DTYPES
    from ulite_monai.bench.models import MODELS
    from ulite_monai.bench.training import TRAIN_MODELS, WORKLOADS

    p = argparse.ArgumentParser(prog="ulite-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["speed"], choices=["speed", "sw", "train", "quality", "all"],
                   help="what to run")
    p.add_argument("--out", default="bench_out", help="output folder (JSON, Markdown, PNG)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, few models and repeats: a smoke run in well under a minute per mode")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N or auto (CUDA when available); CUDA runs every model in one process, "
                        "timed with CUDA events, peak memory from torch.cuda.max_memory_allocated")
    p.add_argument("--amp", default="none", choices=list(AMP_DTYPES),
                   help="autocast dtype on CUDA (fp16 training steps use a GradScaler); none on the CPU")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="on CUDA, leave torch.backends.cudnn.benchmark off (the bench turns it on, as the bundle's "
                        "training does)")
    p.add_argument("--threads", type=int, default=0, help="torch/ONNX Runtime threads (0: torch's default)")
    p.add_argument("--default-allocator", action="store_true",
                   help="leave glibc malloc at its defaults (by default every model runs with "
                        "ulite_monai.utils.tune_cpu_allocator, as the project's inference paths do)")
    p.add_argument("--update", action="store_true",
                   help="keep the other modes' results from an existing benchmark.json in --out and replace only "
                        "the modes run now")
    g = p.add_argument_group("bundle (sw, train, quality)")
    g.add_argument("--bundle", default=None, metavar="FOLDER",
                   help="the bundle folder (default: $ULITE_BUNDLE, else bundles/ulite under the current directory, "
                        "else the bundle beside the package)")
    g.add_argument("--config-override", nargs="+", default=None, metavar="FILE",
                   help="config files merged after the bundle's own (as monai.bundle run --config_file takes them)")
    g.add_argument("--set", nargs="+", default=None, metavar="ID=VALUE", dest="set_ids",
                   help="config settings, e.g. roi_size=[96,96,96] inferer#sw_batch_size=4")
    g = p.add_argument_group("speed")
    g.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help=f"models to compare, or 'all' ({', '.join(MODELS)})")
    g.add_argument("--dims", nargs="+", type=int, default=[2, 3], choices=[2, 3])
    g.add_argument("--repeats", type=int, default=20, help="timed bs1 calls per model in 2D")
    g.add_argument("--repeats-3d", type=int, default=5, help="timed bs1 calls per model in 3D")
    g.add_argument("--warmup", type=int, default=2, help="untimed calls per model before timing")
    g.add_argument("--burst", type=int, default=3,
                   help="bs1 calls per model per round, back to back; the first of each burst is reported as "
                        "the cold latency, the others as the steady-state latency")
    g.add_argument("--throughput-batch", type=int, default=None,
                   help="batch size of the 2D throughput run (0: off; default 8 on the CPU, 32 on CUDA)")
    g.add_argument("--train-batch", type=int, default=1, help="batch size of the training step")
    g.add_argument("--no-train", action="store_true", help="skip training-step measurements")
    g.add_argument("--size-2d", type=int, nargs=2, default=None, help="2D input size (default 256 256)")
    g.add_argument("--size-3d", type=int, nargs=3, default=None, help="3D input size (default 128 128 128)")
    g.add_argument("--max-model-s", type=float, default=300.0,
                   help="wall-time cap per model and workload; a slower model is skipped and the reason recorded")
    g.add_argument("--max-rss-gb", type=float, default=8.0, help="RSS cap per child process (CPU)")
    g = p.add_argument_group("sliding window (sw)")
    g.add_argument("--sw-models", nargs="+", default=["ulite-fused", "monai-unet"], choices=list(MODELS))
    g.add_argument("--sw-volume", type=int, nargs=3, default=None, help="volume size (default 512 512 128)")
    g.add_argument("--sw-roi", type=int, nargs="*", default=None, help="cubic roi edges to sweep (default 64 96 128)")
    g.add_argument("--sw-batch", type=int, nargs="*", default=None,
                   help="sw_batch_size values to sweep (default 1 4 on the CPU, 1 4 8 16 on CUDA)")
    g.add_argument("--sw-overlap", type=float, nargs="*", default=None, help="overlaps to sweep (default 0.25 0.5)")
    g.add_argument("--sw-grid", action="store_true", help="sweep the full grid instead of one setting at a time")
    g.add_argument("--sw-no-sweep", action="store_true", help="measure the bundle's settings only")
    g.add_argument("--sw-repeats", type=int, default=3,
                   help="timed passes per setting, median reported (CPU: rounds of fresh processes, the models of a "
                        "setting in turn in each round; --quick: 1)")
    g = p.add_argument_group("training step (train)")
    g.add_argument("--train-models", nargs="+", default=["ulite", "monai-unet"], choices=list(TRAIN_MODELS),
                   help="-cl: network and input channels-last; -compile: torch.compile")
    g.add_argument("--train-workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    g.add_argument("--train-repeats", type=int, default=10, help="timed steps per model and workload")
    g = p.add_argument_group("quality at equal budget")
    g.add_argument("--budget-s", type=float, default=300.0,
                   help="training budget per model: process CPU seconds on the CPU, wall seconds on CUDA")
    g.add_argument("--quality-models", nargs="+", default=["ulite", "monai-unet"], choices=["ulite", "monai-unet"])
    g.add_argument("--data-dir", default=".ulite_cache/bench_demo",
                   help="the bundle's dataset_dir (the demo data is generated there on first use)")
    g.add_argument("--patch", type=int, default=None, help="cubic training patch edge (default: the bundle's)")
    g.add_argument("--lr", type=float, default=None, help="learning rate for every model (default: the bundle's)")
    return p


# the benchmark.json section each mode writes
MODE_SECTIONS = {"speed": "speed", "sw": "sliding_window", "train": "training_step", "quality": "quality"}


def earlier_results(previous: dict, replaced: list[str]) -> dict:
    """What an ``--update`` run keeps from the ``previous`` benchmark.json when it measures the ``replaced`` sections.

    Returns the kept sections and ``earlier_runs``: one entry per earlier run that still provides a section, with
    the sections it provides (``kept``), its command, time, load average and machine. The previous run's own
    sections are those that no earlier run of its own file provides.
    """
    runs = [dict(r) for r in previous.get("earlier_runs", [])]
    from_earlier = {k for r in runs for k in r.get("kept", [])}
    own = [k for k in MODE_SECTIONS.values() if k in previous and k not in from_earlier]
    env = previous.get("environment") or {}
    runs.append({k: previous.get(k) for k in ("created_utc", "command", "load_average_start", "load_average_end")}
                | {"machine": (env.get("cuda_device") or {}).get("gpu") or env.get("cpu"), "kept": own})
    kept_runs = []
    for run in runs:
        run["kept"] = [k for k in run.get("kept", []) if k not in replaced and k in previous]
        if run["kept"]:
            kept_runs.append(run)
    out = {k: previous[k] for r in kept_runs for k in r["kept"]}
    if kept_runs:
        out["earlier_runs"] = kept_runs
    return out


def _needs_bundle(args, modes: set) -> bool:
    return bool(modes & {"sw", "quality"}) or ("train" in modes and bool({"3d", "bundle"} & set(args.train_workloads)))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from ulite_monai.bench import measure, report
    from ulite_monai.bench.models import DEFAULT_MODELS, MODELS

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.default_allocator:
        os.environ["ULITE_TUNE_ALLOCATOR"] = "0"  # inherited by the probe child processes
    from ulite_monai.utils import tune_cpu_allocator

    tune_cpu_allocator()
    modes = {"speed", "sw", "train", "quality"} if "all" in args.modes else set(args.modes)
    out = Path(args.out)
    q = args.quick

    def fail(msg: str) -> int:
        print(f"ulite-bench: {msg}", file=sys.stderr)
        return 2

    from ulite_monai.bench import device as D

    try:
        dev = D.resolve(args.device)
        amp = D.check_amp(dev, args.amp)
    except ValueError as e:
        return fail(str(e))
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    defaults = _QUICK_MODELS if q else DEFAULT_MODELS
    if cuda:  # ONNX Runtime's CPU provider is not a GPU runtime; named explicitly, it is listed as skipped
        defaults = tuple(m for m in defaults if MODELS[m].runtime != "onnxruntime")
    models = list(args.models or defaults)
    if models == ["all"]:
        models = list(DEFAULT_MODELS)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        return fail(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}.")
    bundle = None
    if _needs_bundle(args, modes):
        from ulite_monai.bundle import Bundle

        try:
            bundle = Bundle(args.bundle, files=args.config_override, overrides=args.set_ids)
        except (FileNotFoundError, ValueError) as e:
            return fail(f"{e} (the sw, train and quality modes read the bundle; pass --bundle <folder>)")

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    result = {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m ulite_monai.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "quick": q,
        "environment": report.environment(dev, amp),
        "load_average_start": measure.load_average(),
    }
    if bundle is not None:
        result["bundle"] = {"root": str(bundle.root), "files": [str(f) for f in bundle.files],
                            "overrides": bundle.overrides}

    if args.update and (out / "benchmark.json").is_file():
        import json

        previous = json.loads((out / "benchmark.json").read_text())
        result.update(earlier_results(previous, [MODE_SECTIONS[m] for m in modes if m in MODE_SECTIONS]))

    def save() -> list[Path]:
        """Write what has been measured so far (after every mode, so an interrupted run keeps its results)."""
        result["load_average_end"] = measure.load_average()
        paths = [report.write_json(result, out / "benchmark.json"),
                 report.write_text(report.markdown(result), out / "benchmark.md")]
        if "speed" in result:
            paths.append(report.plot(result["speed"], out / "latency_vs_params.png"))
        if "training_step" in result:
            paths.append(report.plot_training(result["training_step"], out / "training_step.png"))
        return paths

    if "speed" in modes:
        from ulite_monai.bench.speed import run_speed

        throughput_batch = args.throughput_batch if args.throughput_batch is not None else (32 if cuda else 8)
        if q and throughput_batch:
            throughput_batch = 2

        result["speed"] = run_speed(
            models, dims_list=args.dims,
            repeats=3 if q else args.repeats, repeats_3d=2 if q else args.repeats_3d,
            warmup=1 if q else args.warmup, burst=2 if q else args.burst, throughput_batch=throughput_batch,
            train_batch=max(2, args.train_batch) if q else args.train_batch, train=not args.no_train,
            size_2d=args.size_2d or ((64, 64) if q else (256, 256)),
            size_3d=args.size_3d or ((32, 32, 32) if q else (128, 128, 128)),
            max_model_s=args.max_model_s, max_rss_gb=args.max_rss_gb, log=log, device=dev, amp=amp)
        save()
    if "train" in modes:
        from ulite_monai.bench.training import run_training_step

        try:
            result["training_step"] = run_training_step(
                args.train_models, workloads=args.train_workloads, device=dev, amp=amp,
                repeats=2 if q else args.train_repeats, warmup=1 if q else args.warmup, quick=q, bundle=bundle,
                max_model_s=args.max_model_s, log=log)
        except ValueError as e:
            return fail(str(e))
        save()
    if "sw" in modes:
        from ulite_monai.bench.sliding import bundle_inferer_settings, run_sliding_window, sweep_settings

        try:
            base, source = bundle_inferer_settings(bundle)
        except ValueError as e:
            return fail(str(e))
        if q:
            base = dict(base, roi_size=[32, 32, 32], sw_batch_size=1)
            source += "; --quick: roi 32^3, sw_batch_size 1"
        if args.sw_no_sweep:
            settings = [base]
        else:
            settings = sweep_settings(
                base,
                rois=args.sw_roi if args.sw_roi is not None else ([] if q else [64, 96, 128]),
                batches=args.sw_batch if args.sw_batch is not None
                else ([2] if q else [1, 4, 8, 16] if cuda else [1, 4]),
                overlaps=args.sw_overlap if args.sw_overlap is not None else ([] if q else [0.25, 0.5]),
                grid=args.sw_grid)
        result["sliding_window"] = run_sliding_window(
            args.sw_models, volume=args.sw_volume or ((64, 64, 32) if q else (512, 512, 128)),
            settings=settings, settings_source=source, max_model_s=args.max_model_s,
            max_rss_gb=args.max_rss_gb, log=log, device=dev, amp=amp, repeats=1 if q else args.sw_repeats)
        save()
    if "quality" in modes:
        from ulite_monai.bench.quality import run_quality

        result["quality"] = run_quality(
            args.quality_models, budget_s=args.budget_s if not q else min(args.budget_s, 5.0),
            data_dir=args.data_dir, patch=args.patch, lr=args.lr, quick=q, bundle=bundle, device=dev, amp=amp,
            log=log)
    written = save()
    for path in written:
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
