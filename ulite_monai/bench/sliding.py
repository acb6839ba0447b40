# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Sliding-window mode: wall time and peak RSS of whole-volume inference with MONAI's SlidingWindowInferer.

The window settings start from the bundle's ``inferer`` (``configs/inference.json``, read with
``monai.bundle.ConfigParser``); the sweep varies one setting at a time around them, so that the bundle
defaults can follow the measurements. Every run is a fresh child process (peak RSS includes the runtime,
the weights, the input volume and the output logits).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Sequence

import torch

from ulite_monai.bench import measure
from ulite_monai.bench.models import MODELS

__all__ = ["bundle_inferer_settings", "sweep_settings", "run_sliding_window", "DEFAULT_BUNDLE_INFERENCE"]

DEFAULT_BUNDLE_INFERENCE = Path("bundles") / "ulite" / "configs" / "inference.json"


def _default_config(name: str) -> Path:
    """The bundle's ``configs/<name>``, found as the bundle tools find it (repository root, bundle folder,
    or next to an editable install); the repository-relative path when there is no bundle."""
    try:
        from ulite_monai.bundle_utils import default_bundle_root

        return Path(default_bundle_root()) / "configs" / name
    except Exception:  # noqa: BLE001 - no bundle around: callers fall back and say so
        return Path("bundles") / "ulite" / "configs" / name
_FALLBACK = {"roi_size": [128, 128, 128], "sw_batch_size": 1, "overlap": 0.25, "mode": "gaussian", "features": None}


def bundle_inferer_settings(config_path: str | Path | None = None) -> tuple[dict, str]:
    """``roi_size``, ``sw_batch_size``, ``overlap`` and ``mode`` of the bundle's inferer, the U-Lite ``features``
    of its ``network_def``, and where they came from.

    Falls back to built-in defaults when the file or its ``inferer`` section is missing (the source says so).
    """
    path = Path(config_path) if config_path else _default_config("inference.json")
    if not path.is_file():
        return dict(_FALLBACK), f"built-in defaults ({path} not found)"
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(path))
    if "inferer" not in parser.get():
        return dict(_FALLBACK), f"built-in defaults (no 'inferer' in {path})"
    settings, found = dict(_FALLBACK), []
    for key in ("roi_size", "sw_batch_size", "overlap", "mode"):
        try:
            value = parser.get_parsed_content(f"inferer#{key}")
        except Exception:  # noqa: BLE001 - key absent or not resolvable outside the bundle's run: keep default
            continue
        if key == "roi_size":
            value = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3)]
        elif key == "sw_batch_size":
            value = int(value)
        elif key == "overlap":
            value = float(value if not isinstance(value, (list, tuple)) else value[0])
        else:
            value = str(value)
        settings[key] = value
        found.append(key)
    try:
        features = parser.get_parsed_content("network_def#features")
        settings["features"] = [int(f) for f in features]
        found.append("network_def#features")
    except Exception:  # noqa: BLE001 - not a U-Lite network_def: keep the paper's features
        pass
    return settings, f"{path} ({', '.join(found) or 'nothing readable, defaults used'})"


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


def run_sliding_window(
    models: Sequence[str] = ("ulite-fused", "monai-unet"),
    volume: Sequence[int] = (512, 512, 128),
    settings: Sequence[dict] | None = None,
    settings_source: str = "",
    max_model_s: float = 600.0,
    max_rss_gb: float = 8.0,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure each model under each window setting (child process per run) and pick the fastest per model.

    Args:
        models: benchmark model names (3D is used).
        volume: spatial size of the (random) input volume, one channel.
        settings: list of ``{"roi_size", "sw_batch_size", "overlap", "mode"}``; the bundle's when not given.
        settings_source: where the base settings came from (for the report).
        max_model_s: wall-time cap per run; max_rss_gb: RSS cap per run.
    """
    if settings is None:
        base, settings_source = bundle_inferer_settings()
        settings = [base]
    threads = torch.get_num_threads()
    runs = []
    for name, s in itertools.product(models, settings):
        roi = list(s["roi_size"])
        log(f"[sw] {name}: roi {roi}, sw_batch_size {s['sw_batch_size']}, overlap {s['overlap']} ...")
        features = s.get("features") if MODELS[name].family == "ulite" else None
        res = measure.run_child(
            ["sw", "--model", name, "--roi", *roi, "--sw-batch", s["sw_batch_size"], "--overlap", s["overlap"],
             "--sw-mode", s.get("mode", "gaussian"), "--volume", *volume, "--threads", threads]
            + (["--features", *features] if features else []),
            timeout_s=max_model_s, max_rss_mb=max_rss_gb * 1024)
        rec = {"model": name, "label": MODELS[name].label, "roi": roi, "sw_batch_size": int(s["sw_batch_size"]),
               "overlap": float(s["overlap"]), "mode": s.get("mode", "gaussian"), "status": res.get("status"),
               "features": features}
        if features:
            rec["note"] = f"U-Lite features {tuple(features)} (bundle network_def)"
        if res.get("status") == "ok":
            rec.update(wall_s=res["call_s"], peak_rss_mb=res["peak_rss_mb"], base_rss_mb=res["base_rss_mb"],
                       params=res["params"])
            log(f"[sw]   {res['call_s']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB")
        else:
            rec["note"] = "; ".join(filter(None, [rec.get("note"), res.get("reason", "")]))
            log(f"[sw]   {rec['status']}: {rec['note']}")
        runs.append(rec)
    best = {}
    for name in models:
        ok = [r for r in runs if r["model"] == name and r["status"] == "ok"]
        if ok:
            b = min(ok, key=lambda r: r["wall_s"])
            best[MODELS[name].label] = {k: b[k] for k in ("roi", "sw_batch_size", "overlap", "wall_s", "peak_rss_mb")}
    return {"volume": list(volume), "threads": threads, "settings_source": settings_source, "runs": runs,
            "best": best}
