# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Speed mode: parameters, FLOPs, latency, throughput, training step and peak memory, side by side.

Procedure (per number of spatial dims):

1. each model is first run in its own child process (:mod:`ulite_monai.bench.probe`): parameters,
   FLOPs, peak RSS of bs1 inference and of one training step. The child is killed past the time or
   memory cap, and the model is then listed as skipped with the reason;
2. the models that passed are built in this process, warmed up, and timed *interleaved*: each round
   runs every model in turn, ``burst`` calls back to back (default 3), so that load from other processes
   hits all of them alike. The first call of a burst follows the other models' calls, whose activations
   and weights have evicted this model's from the CPU caches: it is reported apart as the *cold* latency.
   The others are the steady-state latency of a model serving requests back to back, the usual meaning
   of bs1 latency (what ``torch.utils.benchmark`` measures); medians and p90 of those are reported and
   the ratios are computed from them (and, in a second table, from the cold calls). Throughput at batch 8
   (2D) and the training step are interleaved one call at a time.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Callable, Sequence

import torch

from ulite_monai.bench import measure
from ulite_monai.bench.models import MODELS, build_model, input_shape
from ulite_monai.bench.workloads import make_infer, make_input, make_train_step

__all__ = ["run_speed", "interleave", "RATIO_PAIRS"]

#: (numerator model, denominator model, what the ratio means); ratio = latency(denominator) / latency(numerator)
RATIO_PAIRS = (
    ("ulite-fused", "ulite", "fused U-Lite speed-up over the unfused reference structure"),
    ("ulite-fused", "monai-unet", "fused U-Lite speed-up over MONAI UNet"),
    ("ulite-fused", "classic-unet", "fused U-Lite speed-up over the classic U-Net"),
    ("ulite-onnx", "ulite", "ONNX Runtime U-Lite speed-up over the unfused reference structure"),
    ("ulite-onnx", "monai-unet", "ONNX Runtime U-Lite speed-up over MONAI UNet"),
    ("ulite-onnx", "classic-unet", "ONNX Runtime U-Lite speed-up over the classic U-Net"),
    ("ulite-fused", "ulite-fused-nchw", "channels-last speed-up of the fused network"),
    ("ulite-fused-compile", "ulite-fused", "torch.compile speed-up of the fused network"),
)


def interleave(calls: dict[str, Callable[[], object]], rounds: dict[str, int],
                bursts: dict[str, int] | None = None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time ``rounds[name]`` rounds of each callable, each model in turn, ``bursts[name]`` calls back to back.

    Returns ``(samples, cold)``: in a burst of more than one call the first call goes to ``cold`` and the
    others to ``samples``; with bursts of one every call is in both.
    """
    samples: dict[str, list[float]] = {k: [] for k in calls}
    cold: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(max(rounds.values(), default=0)):
        for name, fn in calls.items():
            if r < rounds[name]:
                burst = max(1, (bursts or {}).get(name, 1))
                for i in range(burst):
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                    if i == 0:
                        cold[name].append(dt)
                    if i > 0 or burst <= 1:
                        samples[name].append(dt)
    return samples, cold


def _rounds(repeats: int, est_s: float | None, budget_s: float, minimum: int = 3) -> int:
    """Repeats for one model so that its timed calls stay within ``budget_s`` (at least ``minimum``)."""
    if not est_s or est_s <= 0:
        return repeats
    return max(minimum, min(repeats, int(math.floor(budget_s / est_s))))


def _ulite_params(dims: int) -> int:
    from ulite_monai.bench.models import _ulite

    return measure.param_count(_ulite(dims))


def run_speed(
    models: Sequence[str],
    dims_list: Sequence[int] = (2, 3),
    repeats: int = 20,
    repeats_3d: int = 5,
    warmup: int = 2,
    burst: int = 3,
    throughput_batch: int = 8,
    train_batch: int = 1,
    train: bool = True,
    size_2d: Sequence[int] = (256, 256),
    size_3d: Sequence[int] = (128, 128, 128),
    max_model_s: float = 300.0,
    max_rss_gb: float = 8.0,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the speed benchmark and return its results (see the module docstring).

    Args:
        models: names from :data:`ulite_monai.bench.models.MODELS`.
        dims_list: spatial dims to run (2 and/or 3).
        repeats: timed bs1 calls per model in 2D; ``repeats_3d`` in 3D (fewer for slow models, so that
            one model's timed calls stay within half of ``max_model_s``).
        warmup: untimed calls per model before timing.
        burst: bs1 calls per model per round, back to back (the first is the cold call); models whose
            call takes a second or more run one call per round.
        throughput_batch: batch size of the throughput measurement (2D only; 0 to skip).
        train_batch: batch size of the training step.
        train: measure training steps.
        size_2d: 2D input size; ``size_3d``: 3D input size.
        max_model_s: wall-time cap of each child process (a slower model is skipped, with the reason).
        max_rss_gb: RSS cap of each child process.
        log: progress printer.
    """
    threads = torch.get_num_threads()
    out = {"threads": threads, "results": [], "load_average_start": measure.load_average()}
    common = ["--threads", threads]
    for dims in dims_list:
        size = tuple(size_2d if dims == 2 else size_3d)
        reps = repeats if dims == 2 else repeats_3d
        recs: dict[str, dict] = {}
        for name in models:
            spec = MODELS[name]
            rec = {
                "model": name, "label": spec.label, "family": spec.family, "runtime": spec.runtime,
                "description": spec.description, "dims": dims, "input_shape": list(input_shape(dims, 1, size)),
                "status": "ok", "notes": [],
            }
            recs[name] = rec
            log(f"[{dims}D] probing {name} (child process) ...")
            res = measure.run_child(["infer", "--model", name, "--dims", dims, "--flops", "--size", *size] + common,
                                    timeout_s=max_model_s, max_rss_mb=max_rss_gb * 1024)
            if res.get("status") != "ok":
                rec["status"] = "skipped"
                rec["notes"].append(f"inference: {res.get('reason')}")
                log(f"[{dims}D]   skipped: {res.get('reason')}")
                continue
            rec["params"] = _ulite_params(dims) if spec.family == "ulite" else res["params"]
            if spec.family == "ulite" and res["params"] != rec["params"]:
                rec["stored_weights"] = res["params"]
            rec["flops"] = res.get("flops")
            rec["infer_peak_rss_mb"] = res["peak_rss_mb"]
            rec["infer_delta_rss_mb"] = res["delta_rss_mb"]
            rec["probe_call_s"] = res["call_s"]
            rec["probe_warmup_s"] = res["warmup_s"]
            if train and spec.trainable:
                tres = measure.run_child(["train", "--model", name, "--dims", dims, "--batch", train_batch,
                                          "--size", *size] + common,
                                         timeout_s=max_model_s, max_rss_mb=max_rss_gb * 1024)
                if tres.get("status") == "ok":
                    rec["train_peak_rss_mb"] = tres["peak_rss_mb"]
                    rec["train_delta_rss_mb"] = tres["delta_rss_mb"]
                    rec["probe_train_s"] = tres["call_s"]
                else:
                    rec["notes"].append(f"training step: {tres.get('reason')}")
                    log(f"[{dims}D]   training step skipped: {tres.get('reason')}")

        ok = [n for n in models if recs[n]["status"] == "ok"]
        with tempfile.TemporaryDirectory(prefix="ulite_bench_") as tmp:
            x1 = make_input(dims, 1, size)
            fns = {}
            for n in ok:
                fn, _ = build_model(n, dims, workdir=tmp, size=size)
                fns[n] = fn
            log(f"[{dims}D] warm-up ({warmup} calls each) ...")
            calls = {n: make_infer(fns[n], x1) for n in ok}
            for n in ok:
                t0 = time.perf_counter()
                for _ in range(max(1, warmup)):
                    calls[n]()
                recs[n]["warmup_s"] = time.perf_counter() - t0
            budget = max_model_s / 2
            # calls of a second or more evict the caches themselves: one call per round is enough there
            bursts = {n: max(1, int(burst)) if (recs[n]["probe_call_s"] or 0) < 1.0 else 1 for n in ok}
            rounds = {n: _rounds(reps, (recs[n]["probe_call_s"] or 0) * bursts[n], budget) for n in ok}
            log(f"[{dims}D] latency bs1: interleaved, up to {reps} rounds of up to {burst} calls per model ...")
            lat, cold = interleave(calls, rounds, bursts)
            for n in ok:
                recs[n]["latency_bs1"] = measure.summarise(lat[n])
                recs[n]["latency_bs1_cold"] = measure.summarise(cold[n])
                recs[n]["burst"] = bursts[n]

            if dims == 2 and throughput_batch > 1:
                xb = make_input(dims, throughput_batch, size)
                bcalls = {n: make_infer(fns[n], xb) for n in ok}
                for n in ok:
                    bcalls[n]()  # warm-up at this batch size (re-compiles where needed)
                brounds = {n: max(3, rounds[n] // 4) for n in ok}
                log(f"[{dims}D] throughput bs{throughput_batch}: interleaved ...")
                thr, _ = interleave(bcalls, brounds)
                for n in ok:
                    s = measure.summarise(thr[n])
                    recs[n][f"latency_bs{throughput_batch}"] = s
                    recs[n]["throughput_batch"] = throughput_batch
                    recs[n]["throughput_per_s"] = throughput_batch / (s["median_ms"] / 1000.0)
            del fns, calls

            trainable = [n for n in ok if "train_peak_rss_mb" in recs[n]]
            if train and trainable:
                steps = {}
                for n in trainable:
                    _, net = build_model(n, dims, train=True, size=size)
                    steps[n] = make_train_step(net, dims, train_batch, size)
                    steps[n]()  # warm-up step
                trounds = {n: _rounds(max(3, reps // 4), recs[n]["probe_train_s"], budget) for n in trainable}
                log(f"[{dims}D] training step bs{train_batch}: interleaved ...")
                tr, _ = interleave(steps, trounds)
                for n in trainable:
                    recs[n]["train_step"] = measure.summarise(tr[n])
                    recs[n]["train_batch"] = train_batch
                del steps
        for n in models:
            out["results"].append(recs[n])
    out["load_average_end"] = measure.load_average()
    out["ratios"] = ratios(out["results"])
    out["ratios_cold"] = ratios(out["results"], "latency_bs1_cold")
    return out


def ratios(results: list[dict], key: str = "latency_bs1") -> list[dict]:
    """Same-run latency ratios (bs1 medians of ``key``: steady state, or ``latency_bs1_cold``) for
    :data:`RATIO_PAIRS`, per dims."""
    by = {(r["dims"], r["model"]): r for r in results}
    out = []
    for dims in sorted({r["dims"] for r in results}):
        for fast, slow, what in RATIO_PAIRS:
            a, b = by.get((dims, fast)), by.get((dims, slow))
            if not a or not b or key not in a or key not in b:
                continue
            out.append({"dims": dims, "model": fast, "versus": slow, "meaning": what,
                        "speedup": b[key]["median_ms"] / a[key]["median_ms"]})
    return out
