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

On CUDA (``device="cuda"``) the models are built, probed and timed in this process instead
(:func:`_run_speed_cuda`): peak GPU memory from ``torch.cuda.max_memory_allocated``, calls timed with CUDA events.
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

__all__ = ["run_speed", "interleave", "RATIO_PAIRS", "TRAIN_RATIO_PAIRS"]

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
    ("ulite-default", "monai-unet", "default (unfused) U-Lite speed-up over MONAI UNet"),
)

#: the same for the bs1 training step (``train_step`` medians)
TRAIN_RATIO_PAIRS = (
    ("ulite-default", "monai-unet", "training step: default U-Lite speed-up over MONAI UNet"),
    ("ulite-default", "ulite", "training step: default U-Lite speed-up over the reference structure"),
)


def _wall(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(calls: dict[str, Callable[[], object]], rounds: dict[str, int],
               bursts: dict[str, int] | None = None,
               timer: Callable[[Callable[[], object]], float] | None = None,
               ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time ``rounds[name]`` rounds of each callable, each model in turn, ``bursts[name]`` calls back to back.

    ``timer(fn)`` returns the seconds one call takes (default: wall time; on CUDA pass
    :class:`ulite_monai.bench.device.Timer`, which synchronises and times with CUDA events).

    Returns ``(samples, cold)``: in a burst of more than one call the first call goes to ``cold`` and the
    others to ``samples``; with bursts of one every call is in both.
    """
    timer = timer or _wall
    samples: dict[str, list[float]] = {k: [] for k in calls}
    cold: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(max(rounds.values(), default=0)):
        for name, fn in calls.items():
            if r < rounds[name]:
                burst = max(1, (bursts or {}).get(name, 1))
                for i in range(burst):
                    dt = timer(fn)
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
    device: str | torch.device = "cpu",
    amp: str = "none",
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
        device: ``"cpu"`` (the procedure above) or a CUDA device (:func:`_run_speed_cuda`).
        amp: ``"none"``, or ``"fp16"``/``"bf16"`` autocast (CUDA only).
    """
    dev = torch.device(device)
    if dev.type != "cpu":
        return _run_speed_cuda(models, dev, amp, dims_list=dims_list, repeats=repeats, repeats_3d=repeats_3d,
                               warmup=warmup, burst=burst, throughput_batch=throughput_batch,
                               train_batch=train_batch, train=train, size_2d=size_2d, size_3d=size_3d,
                               max_model_s=max_model_s, log=log)
    if amp not in (None, "none"):
        raise ValueError("mixed precision (--amp) is benchmarked on CUDA only; use --amp none on the CPU.")
    threads = torch.get_num_threads()
    out = {"device": "cpu", "amp": "none", "threads": threads, "results": [],
           "load_average_start": measure.load_average()}
    common = ["--threads", threads]
    for dims in dims_list:
        size = tuple(size_2d if dims == 2 else size_3d)
        reps = repeats if dims == 2 else repeats_3d
        recs: dict[str, dict] = {}
        for name in models:
            spec = MODELS[name]
            rec = _record(name, dims, size)
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
                trounds = {n: _rounds(max(3, reps // 2), recs[n]["probe_train_s"], budget) for n in trainable}
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
    out["train_ratios"] = ratios(out["results"], "train_step", TRAIN_RATIO_PAIRS)
    return out


def _record(name: str, dims: int, size: Sequence[int]) -> dict:
    spec = MODELS[name]
    return {"model": name, "label": spec.label, "family": spec.family, "runtime": spec.runtime,
            "description": spec.description, "dims": dims, "input_shape": list(input_shape(dims, 1, size)),
            "status": "ok", "notes": []}


def _run_speed_cuda(
    models: Sequence[str],
    dev: torch.device,
    amp: str,
    dims_list: Sequence[int],
    repeats: int,
    repeats_3d: int,
    warmup: int,
    burst: int,
    throughput_batch: int,
    train_batch: int,
    train: bool,
    size_2d: Sequence[int],
    size_3d: Sequence[int],
    max_model_s: float,
    log: Callable[[str], None],
) -> dict:
    """The speed benchmark on a CUDA device, in this process (one CUDA context for all models).

    Per model: build it on the CPU (U-Lite: fuse there), move it, run ``warmup`` calls (cuDNN autotuning and,
    for ``torch.compile``, compilation), then one call with the peak-memory counter reset: *peak GPU memory* is
    ``torch.cuda.max_memory_allocated`` during that call minus what was allocated before the model was built,
    plus the input: the weights, input, activations and output of one call. The same for one training step
    (weights, gradients, optimiser state, activations). A model that fails (e.g. out of memory) is listed as
    skipped with the error; ONNX Runtime's CPU provider is not run. Timing is interleaved in bursts as on the
    CPU, each call timed with CUDA events after synchronising (:class:`ulite_monai.bench.device.Timer`).
    """
    from ulite_monai.bench import device as D

    amp = D.check_amp(dev, amp)
    timer = D.Timer(dev)
    threads = torch.get_num_threads()
    out = {"device": str(dev), "amp": amp, "threads": threads, "results": [],
           "load_average_start": measure.load_average()}
    budget = max_model_s / 2
    for dims in dims_list:
        size = tuple(size_2d if dims == 2 else size_3d)
        reps = repeats if dims == 2 else repeats_3d
        recs: dict[str, dict] = {}
        calls: dict[str, Callable[[], object]] = {}
        fns: dict[str, Callable] = {}
        steps: dict[str, Callable[[], object]] = {}
        x1 = make_input(dims, 1, size, device=dev)
        x1_mb = x1.numel() * x1.element_size() / 2**20
        with tempfile.TemporaryDirectory(prefix="ulite_bench_") as tmp:
            for name in models:
                spec = MODELS[name]
                rec = recs[name] = _record(name, dims, size)
                if spec.runtime == "onnxruntime":
                    rec["status"] = "skipped"
                    rec["notes"].append("ONNX Runtime's CPU provider: benchmarked on the CPU only")
                    continue
                log(f"[{dims}D] {name} on {dev} (amp {amp}): build, warm-up, peak memory ...")
                try:
                    before = D.gpu_allocated_mb(dev)
                    fn, net = build_model(name, dims, workdir=tmp, size=size, device=dev)
                    call = make_infer(fn, x1, amp)
                    t0 = time.perf_counter()
                    for _ in range(max(1, warmup)):
                        call()
                    D.synchronize(dev)
                    rec["warmup_s"] = time.perf_counter() - t0
                    D.reset_gpu_peak(dev)
                    rec["probe_call_s"] = timer(call)
                    rec["infer_peak_gpu_mb"] = D.gpu_peak_mb(dev) - before + x1_mb
                    rec["params"] = _ulite_params(dims) if spec.family == "ulite" else measure.param_count(net)
                    if spec.family == "ulite" and measure.param_count(net) != rec["params"]:
                        rec["stored_weights"] = measure.param_count(net)
                    rec["flops"] = measure.flops_of(net, x1)
                    fns[name], calls[name] = fn, call
                except Exception as e:  # noqa: BLE001 - out of memory, unsupported op: record and go on
                    rec["status"] = "skipped"
                    rec["notes"].append(f"inference: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    log(f"[{dims}D]   skipped: {rec['notes'][-1]}")
                    torch.cuda.empty_cache()
                    continue
                if train and spec.trainable:
                    try:
                        before = D.gpu_allocated_mb(dev)
                        _, tnet = build_model(name, dims, train=True, size=size, device=dev)
                        step = make_train_step(tnet, dims, train_batch, size, device=dev, amp=amp)
                        for _ in range(max(1, warmup)):
                            step()
                        D.reset_gpu_peak(dev)
                        rec["probe_train_s"] = timer(step)
                        rec["train_peak_gpu_mb"] = D.gpu_peak_mb(dev) - before
                        steps[name] = step
                    except Exception as e:  # noqa: BLE001
                        rec["notes"].append(f"training step: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                        log(f"[{dims}D]   training step skipped: {rec['notes'][-1]}")
                        torch.cuda.empty_cache()
            ok = list(calls)
            bursts = {n: max(1, int(burst)) if (recs[n]["probe_call_s"] or 0) < 1.0 else 1 for n in ok}
            rounds = {n: _rounds(reps, (recs[n]["probe_call_s"] or 0) * bursts[n], budget) for n in ok}
            log(f"[{dims}D] latency bs1: interleaved, up to {reps} rounds of up to {burst} calls per model ...")
            lat, cold = interleave(calls, rounds, bursts, timer)
            for n in ok:
                recs[n]["latency_bs1"] = measure.summarise(lat[n])
                recs[n]["latency_bs1_cold"] = measure.summarise(cold[n])
                recs[n]["burst"] = bursts[n]
            if dims == 2 and throughput_batch > 1 and ok:
                xb = make_input(dims, throughput_batch, size, device=dev)
                bcalls = {n: make_infer(fns[n], xb, amp) for n in ok}
                for n in ok:
                    bcalls[n]()  # warm-up at this batch size (autotuning, re-compiles where needed)
                brounds = {n: max(3, rounds[n] // 4) for n in ok}
                log(f"[{dims}D] throughput bs{throughput_batch}: interleaved ...")
                thr, _ = interleave(bcalls, brounds, timer=timer)
                for n in ok:
                    st = measure.summarise(thr[n])
                    recs[n][f"latency_bs{throughput_batch}"] = st
                    recs[n]["throughput_batch"] = throughput_batch
                    recs[n]["throughput_per_s"] = throughput_batch / (st["median_ms"] / 1000.0)
                del xb, bcalls
            if steps:
                trounds = {n: _rounds(max(3, reps // 2), recs[n]["probe_train_s"], budget) for n in steps}
                log(f"[{dims}D] training step bs{train_batch}: interleaved ...")
                tr, _ = interleave(steps, trounds, timer=timer)
                for n in steps:
                    recs[n]["train_step"] = measure.summarise(tr[n])
                    recs[n]["train_batch"] = train_batch
            del fns, calls, steps, x1
            torch.cuda.empty_cache()
        out["results"].extend(recs[n] for n in models)
    out["load_average_end"] = measure.load_average()
    out["ratios"] = ratios(out["results"])
    out["ratios_cold"] = ratios(out["results"], "latency_bs1_cold")
    out["train_ratios"] = ratios(out["results"], "train_step", TRAIN_RATIO_PAIRS)
    return out


def ratios(results: list[dict], key: str = "latency_bs1", pairs=RATIO_PAIRS) -> list[dict]:
    """Same-run ratios of the medians of ``key`` (``latency_bs1``: steady state, ``latency_bs1_cold``, or
    ``train_step``) for ``pairs`` (:data:`RATIO_PAIRS` or :data:`TRAIN_RATIO_PAIRS`), per dims."""
    by = {(r["dims"], r["model"]): r for r in results}
    out = []
    for dims in sorted({r["dims"] for r in results}):
        for fast, slow, what in pairs:
            a, b = by.get((dims, fast)), by.get((dims, slow))
            if not a or not b or key not in a or key not in b:
                continue
            out.append({"dims": dims, "model": fast, "versus": slow, "meaning": what,
                        "speedup": b[key]["median_ms"] / a[key]["median_ms"]})
    return out
