# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Sliding-window mode: time and peak memory of whole-volume inference with MONAI's SlidingWindowInferer.

The window settings start from the bundle's ``inferer`` (its ``configs/inference.json`` with the override files
and settings of a :class:`~ulite_monai.bundle.Bundle`); the sweep varies one setting at a time around them, so
that the bundle defaults can follow the measurements.

- CPU: every run is a fresh child process (peak RSS includes the runtime, the weights, the input volume and the
  output logits) timing one pass over the volume after a one-window warm-up. ``repeats`` rounds go over all
  settings, and within a setting over all models in turn, so that the models of one setting are measured side by
  side whatever the load of a shared machine does meanwhile; the median pass is reported (each pass is kept in
  ``wall_s_runs``) with the highest peak RSS.
- CUDA: one process; per model and setting, one untimed pass over the volume (cuDNN autotuning for every window
  batch shape), then ``repeats`` passes timed with CUDA events (median reported). Peak GPU memory is
  ``torch.cuda.max_memory_allocated`` during a pass minus what was allocated before the model was built:
  weights, input volume, output logits and window buffers.
"""

from __future__ import annotations

import functools
import itertools
import os
import statistics
import time
from typing import Callable, Sequence

import torch

from ulite_monai.bench import measure
from ulite_monai.bench.models import MODELS

__all__ = ["bundle_inferer_settings", "sweep_settings", "run_sliding_window"]


def bundle_inferer_settings(bundle=None) -> tuple[dict, str]:
    """``roi_size``, ``sw_batch_size``, ``overlap`` and ``mode`` of the bundle's inference ``inferer``, the U-Lite
    ``features`` of its ``network_def`` (``None`` when the network is not U-Lite), and where they came from.

    Args:
        bundle: a :class:`~ulite_monai.bundle.Bundle`, a bundle folder, or ``None`` (located as every door
            locates it: ``$ULITE_BUNDLE``, ``bundles/ulite`` under the current directory, ...).

    Raises:
        FileNotFoundError: no bundle (the message says what to pass).
        ValueError: the bundle's network is not 3D, or its ``inferer`` is not a sliding-window inferer.
    """
    from ulite_monai.bundle import Bundle

    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    parser = b.parser("inference")
    info = b.info(parser)
    if info.spatial_dims != 3:
        raise ValueError(f"the sliding-window benchmark runs a 3D volume, but the bundle at {b.root} configures a "
                         f"{info.spatial_dims}D network; pass a 3D bundle or config overrides.")
    if "inferer" not in parser:
        raise ValueError(f"the bundle's inference.json ({b.root}) has no 'inferer'.")
    inferer = parser.get_parsed_content("inferer")
    missing = [k for k in ("roi_size", "sw_batch_size", "overlap", "mode") if not hasattr(inferer, k)]
    if missing:
        raise ValueError(f"the bundle's inferer ({type(inferer).__name__}, {b.root}) is not a sliding-window "
                         f"inferer (no {', '.join(missing)}); the sliding-window benchmark needs one.")
    roi = inferer.roi_size
    roi = [int(v) for v in (roi if isinstance(roi, (list, tuple)) else [roi] * 3)]
    overlap = inferer.overlap
    mode = inferer.mode
    settings = {
        "roi_size": roi,
        "sw_batch_size": int(inferer.sw_batch_size),
        "overlap": float(overlap[0] if isinstance(overlap, (list, tuple)) else overlap),
        "mode": str(getattr(mode, "value", mode)),
        "features": None,
    }
    read = ["inferer"]
    target = str(parser["network_def"].get("_target_", "")) if isinstance(parser["network_def"], dict) else ""
    if target.endswith("ULite") and "network_def#features" in parser:
        settings["features"] = [int(f) for f in parser.get_parsed_content("network_def#features")]
        read.append("network_def#features")
    layers = ["configs/inference.json"] + [os.fspath(f) for f in b.files]
    if b.overrides:
        layers.append("overrides " + ", ".join(f"{k}={v!r}" for k, v in b.overrides.items()))
    return settings, f"bundle {b.root} ({' + '.join(layers)}: {', '.join(read)})"


def sweep_settings(base: dict, rois: Sequence[int] | None = None, batches: Sequence[int] | None = None,
                   overlaps: Sequence[float] | None = None, grid: bool = False) -> list[dict]:
    """The settings to measure: ``base`` first, then each listed value of one setting with the others at base
    (``grid=True``: the full grid)."""
    rois = [int(r) for r in (rois or [])]
    batches = [int(b) for b in (batches or [])]
    overlaps = [float(o) for o in (overlaps or [])]
    out = [dict(base)]

    def add(s):
        if s not in out:
            out.append(s)

    if grid:
        for r, b, o in itertools.product(rois or [None], batches or [None], overlaps or [None]):
            s = dict(base)
            if r is not None:
                s["roi_size"] = [r] * 3
            if b is not None:
                s["sw_batch_size"] = b
            if o is not None:
                s["overlap"] = o
            add(s)
        return out
    for r in rois:
        add(dict(base, roi_size=[r] * 3))
    for b in batches:
        add(dict(base, sw_batch_size=b))
    for o in overlaps:
        add(dict(base, overlap=o))
    return out


def _record(name: str, s: dict) -> dict:
    features = s.get("features") if MODELS[name].family == "ulite" else None
    rec = {"model": name, "label": MODELS[name].label, "roi": list(s["roi_size"]),
           "sw_batch_size": int(s["sw_batch_size"]), "overlap": float(s["overlap"]), "mode": s.get("mode", "gaussian"),
           "status": None, "features": features}
    if features:
        rec["note"] = f"U-Lite features {tuple(features)} (bundle network_def)"
    return rec


def _runs_cpu(models, volume, settings, max_model_s, max_rss_gb, log, repeats: int = 1) -> list[dict]:
    threads = torch.get_num_threads()
    recs = {(name, i): _record(name, s) for i, s in enumerate(settings) for name in models}
    passes: dict[tuple, list[float]] = {k: [] for k in recs}
    rounds = max(1, int(repeats))
    for rnd in range(rounds):
        for i in range(len(settings)):
            for name in models:
                rec = recs[(name, i)]
                if rec["status"] not in (None, "ok"):
                    continue  # failed (timeout, memory cap, error) in an earlier round: not retried
                log(f"[sw] {name}: roi {rec['roi']}, sw_batch_size {rec['sw_batch_size']}, overlap {rec['overlap']}"
                    + (f" (round {rnd + 1}/{rounds})" if rounds > 1 else "") + " ...")
                res = measure.run_child(
                    ["sw", "--model", name, "--roi", *rec["roi"], "--sw-batch", rec["sw_batch_size"], "--overlap",
                     rec["overlap"], "--sw-mode", rec["mode"], "--volume", *volume, "--threads", threads]
                    + (["--features", *rec["features"]] if rec["features"] else []),
                    timeout_s=max_model_s, max_rss_mb=max_rss_gb * 1024)
                rec["status"] = res.get("status")
                if res.get("status") == "ok":
                    passes[(name, i)].append(float(res["call_s"]))
                    rec.update(peak_rss_mb=max(res["peak_rss_mb"], rec.get("peak_rss_mb", 0.0)),
                               base_rss_mb=res["base_rss_mb"], params=res["params"])
                    log(f"[sw]   {res['call_s']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB")
                else:
                    why = res.get("reason", "")
                    if rnd:
                        why = f"round {rnd + 1}: {why}"
                    rec["note"] = "; ".join(filter(None, [rec.get("note"), why]))
                    rec.pop("peak_rss_mb", None)
                    log(f"[sw]   {rec['status']}: {rec['note']}")
    for key, rec in recs.items():
        if rec["status"] == "ok":
            rec.update(wall_s=statistics.median(passes[key]), wall_s_runs=passes[key])
    return [recs[(name, i)] for name in models for i in range(len(settings))]


def _runs_cuda(models, volume, settings, dev, amp, repeats, max_model_s, log) -> list[dict]:
    from ulite_monai.bench import device as D
    from ulite_monai.bench.models import build_model
    from ulite_monai.bench.workloads import make_input, make_sliding_window

    timer = D.Timer(dev)
    runs = []
    for name in models:
        recs = [_record(name, s) for s in settings]
        if MODELS[name].runtime == "onnxruntime":
            for rec in recs:
                rec["status"] = "skipped"
                rec["note"] = "ONNX Runtime's CPU provider: benchmarked on the CPU only"
            runs += recs
            continue
        started = time.perf_counter()
        try:
            before = D.gpu_allocated_mb(dev)
            fn, net = build_model(name, 3, features=recs[0]["features"], device=dev)
            vol = make_input(3, 1, volume, device=dev)
        except Exception as e:  # noqa: BLE001 - record and go on with the next model
            for rec in recs:
                rec["status"] = "skipped"
                rec["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            runs += recs
            continue
        for rec in recs:
            log(f"[sw] {name} on {dev} (amp {amp}): roi {rec['roi']}, sw_batch_size {rec['sw_batch_size']}, "
                f"overlap {rec['overlap']} ...")
            if time.perf_counter() - started > max_model_s:
                rec["status"] = "skipped"
                rec["note"] = f"the model's runs passed the {max_model_s:.0f} s cap (--max-model-s)"
                runs.append(rec)
                continue
            try:
                sw = make_sliding_window(fn, rec["roi"], rec["sw_batch_size"], rec["overlap"], rec["mode"], amp=amp)
                t0 = time.perf_counter()
                sw(vol)  # untimed: cuDNN autotuning for the full and the last (partial) window batch
                D.synchronize(dev)
                rec["warmup_s"] = time.perf_counter() - t0
                times = []
                pass_over = functools.partial(sw, vol)
                for i in range(max(1, repeats)):
                    if i == 0:
                        D.reset_gpu_peak(dev)
                    times.append(timer(pass_over))
                    if i == 0:
                        rec["peak_gpu_mb"] = D.gpu_peak_mb(dev) - before
                rec.update(status="ok", wall_s=statistics.median(times), wall_s_runs=times,
                           params=measure.param_count(net))
                log(f"[sw]   {rec['wall_s']:.3f} s (median of {len(times)}), peak GPU memory "
                    f"{rec['peak_gpu_mb']:.0f} MB")
            except Exception as e:  # noqa: BLE001 - out of memory at a large roi/batch: record and go on
                rec["status"] = "skipped"
                rec["note"] = "; ".join(filter(None, [rec.get("note"),
                                                      f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"]))
                log(f"[sw]   skipped: {rec['note']}")
                torch.cuda.empty_cache()
            runs.append(rec)
        fn = net = vol = None  # free this model's weights and volume before the next one
        torch.cuda.empty_cache()
    return runs


def run_sliding_window(
    models: Sequence[str] = ("ulite-fused", "monai-unet"),
    volume: Sequence[int] = (512, 512, 128),
    settings: Sequence[dict] | None = None,
    settings_source: str = "",
    max_model_s: float = 600.0,
    max_rss_gb: float = 8.0,
    log: Callable[[str], None] = print,
    device: str | torch.device = "cpu",
    amp: str = "none",
    repeats: int = 3,
    bundle=None,
) -> dict:
    """Measure each model under each window setting and pick the fastest per model (see the module docstring).

    Args:
        models: benchmark model names (3D is used).
        volume: spatial size of the (random) input volume, one channel.
        settings: list of ``{"roi_size", "sw_batch_size", "overlap", "mode", "features"}``; the bundle's when not
            given (:func:`bundle_inferer_settings` of ``bundle``).
        settings_source: where the base settings came from (for the report).
        max_model_s: wall-time cap per run (CPU) or per model (CUDA); max_rss_gb: RSS cap per run (CPU).
        device: ``"cpu"`` or a CUDA device; amp: ``"none"``, ``"fp16"`` or ``"bf16"`` (CUDA only).
        repeats: timed passes per setting (the median is reported): on CUDA in one process, on the CPU in as many
            rounds of fresh processes, the models of a setting side by side in each round.
        bundle: the bundle whose settings are used when ``settings`` is not given.
    """
    if settings is None:
        base, settings_source = bundle_inferer_settings(bundle)
        settings = [base]
    dev = torch.device(device)
    if dev.type == "cpu":
        if amp not in (None, "none"):
            raise ValueError("mixed precision (--amp) is benchmarked on CUDA only; use --amp none on the CPU.")
        runs = _runs_cpu(models, volume, settings, max_model_s, max_rss_gb, log, repeats)
        mem_key = "peak_rss_mb"
    else:
        runs = _runs_cuda(models, volume, settings, dev, amp, repeats, max_model_s, log)
        mem_key = "peak_gpu_mb"
    best = {}
    for name in models:
        ok = [r for r in runs if r["model"] == name and r["status"] == "ok"]
        if ok:
            b = min(ok, key=lambda r: r["wall_s"])
            best[MODELS[name].label] = {k: b[k] for k in ("roi", "sw_batch_size", "overlap", "wall_s", mem_key)}
    return {"volume": list(volume), "device": str(dev), "amp": amp or "none", "threads": torch.get_num_threads(),
            "settings_source": settings_source, "runs": runs, "best": best}
