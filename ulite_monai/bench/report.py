# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Benchmark outputs: JSON (everything), Markdown tables, and a latency-vs-parameters plot (PNG)."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from ulite_monai.utils import save_atomically

__all__ = ["environment", "write_json", "write_text", "markdown", "plot"]


def environment() -> dict:
    """Where the figures come from: CPU, cores, threads, library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    for mod in ("monai", "onnxruntime", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    from ulite_monai.utils import allocator_settings

    env["allocator"] = allocator_settings()
    env["git"] = _git_state()
    try:
        import psutil

        env["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return env


def _git_state() -> dict | None:
    """Commit of the source tree and whether the network code differs from it (figures follow the code)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "ulite_monai/networks"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": rev, "networks_modified": [ln[3:] for ln in dirty if ln.strip()]}


def _atomic_write(path: Path, data: bytes) -> None:
    save_atomically(lambda tmp: Path(tmp).write_bytes(data), path)


def write_json(obj, path) -> Path:
    path = Path(path)
    _atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
    return path


def write_text(text: str, path) -> Path:
    path = Path(path)
    _atomic_write(path, text.encode())
    return path


def _f(v, fmt="{:.1f}", none="–") -> str:
    return none if v is None else fmt.format(v)


def _params(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} K"


def _speed_tables(speed: dict) -> list[str]:
    lines = []
    for dims in sorted({r["dims"] for r in speed["results"]}):
        rows = [r for r in speed["results"] if r["dims"] == dims]
        shape = "x".join(str(s) for s in rows[0]["input_shape"])
        tb = next((r.get("throughput_batch") for r in rows if r.get("throughput_batch")), None)
        lines += [f"### {dims}D, input {shape}", ""]
        head = ["Model", "Params", "GFLOPs", "bs1 median (ms)", "bs1 p90 (ms)", "bs1 cold median (ms)"]
        if tb:
            head.append(f"bs{tb} throughput (img/s)")
        head += ["train step (ms)", "peak RSS infer (MB)", "peak RSS train (MB)", "notes"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|")
        for r in rows:
            lat = r.get("latency_bs1") or {}
            cold = r.get("latency_bs1_cold") or {}
            tr = r.get("train_step") or {}
            cells = [r["label"], _params(r.get("params")),
                     _f(r["flops"] / 1e9 if r.get("flops") else None, "{:.2f}"),
                     _f(lat.get("median_ms")), _f(lat.get("p90_ms")), _f(cold.get("median_ms"))]
            if tb:
                cells.append(_f(r.get("throughput_per_s")))
            notes = list(r.get("notes", []))
            if r.get("stored_weights"):
                notes.insert(0, f"{r['stored_weights']:,} stored weights after fusion")
            cells += [_f(tr.get("median_ms")), _f(r.get("infer_peak_rss_mb"), "{:.0f}"),
                      _f(r.get("train_peak_rss_mb"), "{:.0f}"), "; ".join(notes)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if speed.get("ratios"):
        cold = {(q["dims"], q["model"], q["versus"]): q["speedup"] for q in speed.get("ratios_cold", [])}
        lines += ["### Same-run ratios (bs1 median latency)", "",
                  "| dims | ratio | speed-up | cold calls |", "|---|---|---:|---:|"]
        for q in speed["ratios"]:
            c = cold.get((q["dims"], q["model"], q["versus"]))
            lines.append(f"| {q['dims']}D | {q['meaning']} | {q['speedup']:.2f}x | "
                         + (f"{c:.2f}x" if c else "–") + " |")
        lines.append("")
    return lines


def _sw_table(sw: dict) -> list[str]:
    lines = ["### Sliding-window inference, volume " + "x".join(str(v) for v in sw["volume"]), ""]
    src = sw.get("settings_source")
    if src:
        lines += [f"Bundle inferer settings: {src}.", ""]
    lines += ["| Model | roi | sw_batch_size | overlap | wall time (s) | peak RSS (MB) | notes |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in sw["runs"]:
        lines.append(
            f"| {r['label']} | {'x'.join(str(v) for v in r['roi'])} | {r['sw_batch_size']} | {r['overlap']} | "
            f"{_f(r.get('wall_s'))} | {_f(r.get('peak_rss_mb'), '{:.0f}')} | {r.get('note', '')} |")
    lines.append("")
    for k, v in (sw.get("best") or {}).items():
        lines.append(f"- fastest for {k}: roi {'x'.join(str(x) for x in v['roi'])}, sw_batch_size "
                     f"{v['sw_batch_size']}, overlap {v['overlap']}: {v['wall_s']:.1f} s, {v['peak_rss_mb']:.0f} MB")
    lines.append("")
    return lines


def _quality_table(q: dict) -> list[str]:
    lines = [f"### Quality at equal budget ({q['budget_cpu_s']:.0f} CPU-seconds of training each)", "",
             f"Data: {q['data']}.", "",
             "| Model | Params | steps | CPU time (s) | wall time (s) | val Dice (mean) | per case |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in q["runs"]:
        lines.append(f"| {r['label']} | {_params(r.get('params'))} | {r['steps']} | {r['cpu_s']:.0f} | "
                     f"{r['wall_s']:.0f} | {r['dice_mean']:.3f} | "
                     + ", ".join(f"{d:.3f}" for d in r["dice_per_case"]) + " |")
    lines.append("")
    return lines


def markdown(report: dict) -> str:
    """The Markdown summary of a benchmark report (all modes that ran)."""
    env = report["environment"]
    lines = ["# U-Lite benchmark", "",
             f"Generated {report['created_utc']} by `{report['command']}`.", "",
             f"Machine: {env['cpu']}, {env['cpu_count']} logical CPUs, {env.get('memory_gb', '?')} GB RAM; "
             f"torch {env['torch']} with {env['torch_threads']} threads, MONAI {env['monai']}, "
             f"ONNX Runtime {env['onnxruntime']}. CPU allocator: {env.get('allocator', 'default')} (every model "
             "alike)."
             + (f" Source: commit {env['git']['commit']}"
                + (f" with uncommitted changes in {', '.join(env['git']['networks_modified'])}"
                   if env["git"]["networks_modified"] else "") + "." if env.get("git") else ""),
             f"Load average (1/5/15 min) at start {report.get('load_average_start')}, at end "
             f"{report.get('load_average_end')}: other processes shared the CPUs, so compare figures within "
             "this run (ratios), not across machines.", ""]
    for run in report.get("earlier_runs", []):
        lines += [f"Results of {', '.join(run['kept'])} are from another run: `{run['command']}` at "
                  f"{run['created_utc']} (load average {run.get('load_average_start')} to "
                  f"{run.get('load_average_end')}).", ""]
    if "speed" in report:
        lines += ["## Speed and memory", "",
                  "Latency: each round runs every model in turn, a burst of calls back to back (after warm-up). "
                  "bs1 median and p90: the calls after the first of each burst, the steady-state latency of a "
                  "model serving requests back to back. bs1 cold: the first call of each burst, which runs "
                  "after the other models have evicted this one's weights and activations from the CPU "
                  "caches. Ratios use the steady-state medians; the cold column gives them from the cold "
                  "calls. "
                  "Peak RSS: a fresh child process per model builds it, warms up, resets the high-water mark "
                  "and runs the workload; the figure includes the Python/torch runtime and the weights.", ""]
        lines += _speed_tables(report["speed"])
    if "sliding_window" in report:
        lines += ["## Sliding-window inference", ""] + _sw_table(report["sliding_window"])
    if "quality" in report:
        lines += ["## Quality at equal training budget", ""] + _quality_table(report["quality"])
    return "\n".join(lines).rstrip() + "\n"


def plot(speed: dict, path) -> Path:
    """Latency (bs1 median) against parameters, one panel per dims, marker area by FLOPs; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims_list = sorted({r["dims"] for r in speed["results"]})
    fig, axes = plt.subplots(1, len(dims_list), figsize=(6.5 * len(dims_list), 5), squeeze=False)
    for ax, dims in zip(axes[0], dims_list):
        rows = [r for r in speed["results"] if r["dims"] == dims and r.get("latency_bs1") and r.get("params")]
        fmax = max(((r.get("flops") or 0) for r in rows), default=0) or 1
        for r in rows:
            colour = "tab:red" if r["family"] == "ulite" else "tab:blue"
            size = 30 + 1500 * ((r.get("flops") or 0) / fmax) ** 0.5
            ax.scatter(r["params"], r["latency_bs1"]["median_ms"], s=size, c=colour, alpha=0.5, edgecolors="k")
            ax.annotate(r["label"], (r["params"], r["latency_bs1"]["median_ms"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("latency bs1, median (ms)")
        shape = "x".join(str(s) for s in rows[0]["input_shape"]) if rows else ""
        ax.set_title(f"{dims}D {shape} ({speed['threads']} threads); marker area ~ FLOPs")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    try:
        save_atomically(lambda tmp: fig.savefig(tmp, dpi=110), path)
    finally:
        plt.close(fig)
    return path
