# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Child process of the benchmark: builds one model, measures one workload's peak RSS, prints JSON.

Run by :func:`ulite_monai.bench.measure.run_child`; one model per process so that memory figures are
not polluted by other models, and a model that is too slow or too large can be killed on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m ulite_monai.bench.probe")
    p.add_argument("task", choices=["infer", "train", "sw"])
    p.add_argument("--model", required=True)
    p.add_argument("--dims", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--size", type=int, nargs="*", default=None)
    p.add_argument("--roi", type=int, nargs="*", default=None)
    p.add_argument("--sw-batch", type=int, default=1)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--sw-mode", default="gaussian")
    p.add_argument("--volume", type=int, nargs="*", default=[512, 512, 128])
    p.add_argument("--features", type=int, nargs="*", default=None, help="U-Lite features")
    p.add_argument("--flops", action="store_true", help="also count FLOPs of the forward pass")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    warnings.filterwarnings("ignore")
    import torch

    from ulite_monai.bench import measure
    from ulite_monai.bench.models import build_model
    from ulite_monai.bench.workloads import make_infer, make_input, make_sliding_window, make_train_step

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from ulite_monai.utils import tune_cpu_allocator

    tune_cpu_allocator()  # the parent's choice arrives through ULITE_TUNE_ALLOCATOR
    res: dict = {"status": "ok", "task": args.task, "model": args.model, "dims": args.dims,
                 "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="ulite_bench_") as tmp:
        if args.task == "train":
            _, net = build_model(args.model, args.dims, train=True, size=args.size, features=args.features)
            work = make_train_step(net, args.dims, args.batch, args.size)
        elif args.task == "infer":
            fn, net = build_model(args.model, args.dims, workdir=tmp, size=args.size, features=args.features)
            x = make_input(args.dims, args.batch, args.size)
            work = make_infer(fn, x)
        else:
            fn, net = build_model(args.model, 3, workdir=tmp, features=args.features)
            roi = args.roi or [128, 128, 128]
            sw = make_sliding_window(fn, roi, args.sw_batch, args.overlap, args.sw_mode)
            volume = make_input(3, 1, args.volume)
            warm = make_input(3, 1, roi)
            work = lambda: sw(volume)  # noqa: E731
            t0 = time.perf_counter()
            make_infer(fn, warm)()  # one window: initialises kernels/compilation outside the measurement
            res["warmup_s"] = time.perf_counter() - t0
            res.update(roi=roi, sw_batch_size=args.sw_batch, overlap=args.overlap, mode=args.sw_mode,
                       volume=args.volume)
        if args.task != "sw":
            t0 = time.perf_counter()
            work()  # warm-up (and, for torch.compile, compilation)
            res["warmup_s"] = time.perf_counter() - t0
        measure.trim_heap()
        res["peak_reset"] = measure.reset_peak_rss()
        res["base_rss_mb"] = measure.rss_mb()
        t0 = time.perf_counter()
        work()
        res["call_s"] = time.perf_counter() - t0
        res["peak_rss_mb"] = measure.peak_rss_mb()
        res["delta_rss_mb"] = res["peak_rss_mb"] - res["base_rss_mb"]
        res["params"] = measure.param_count(net)
        if args.flops and args.task == "infer":
            res["flops"] = measure.flops_of(net, make_input(args.dims, args.batch, args.size))
    print(json.dumps(res))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
