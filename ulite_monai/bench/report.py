# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Benchmark outputs: JSON (everything), Markdown tables, and a latency-vs-parameters plot (PNG)."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from ulite_monai.utils import save_atomically

__all__ = ["environment", "write_json", "write_text", "markdown", "plot", "plot_training"]


def environment(device=None, amp: str = "none") -> dict:
    """Where the figures come from: CPU, cores, threads, library versions; on CUDA the GPU, its driver, CUDA,
    cuDNN and math settings (``device``), and the ``amp`` setting."""
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
        # the vector instructions PyTorch's kernels (and the project's, built for this CPU) use: AVX512, AVX2, ...
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
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
    env["source_sha256"] = _source_digest()
    dev = torch.device(device or "cpu")
    env["device"] = str(dev)
    env["amp"] = amp or "none"
    if dev.type == "cuda":
        from ulite_monai.bench.device import cuda_environment

        env["cuda_device"] = cuda_environment(dev)
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


def _source_digest() -> str:
    """SHA-256 (16 hex digits) of the package's Python sources: which code measured, where there is no git."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


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
        gpu = str(speed.get("device", "cpu")).startswith("cuda")
        mem = "peak GPU memory" if gpu else "peak RSS"
        head += ["train step (ms)", f"{mem} infer (MB)", f"{mem} train (MB)", "notes"]
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
            key = "gpu" if gpu else "rss"
            cells += [_f(tr.get("median_ms")), _f(r.get(f"infer_peak_{key}_mb"), "{:.0f}"),
                      _f(r.get(f"train_peak_{key}_mb"), "{:.0f}"), "; ".join(notes)]
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
    if speed.get("train_ratios"):
        lines += ["### Same-run ratios (training step, median)", "",
                  "| dims | ratio | speed-up |", "|---|---|---:|"]
        lines += [f"| {q['dims']}D | {q['meaning']} | {q['speedup']:.2f}x |" for q in speed["train_ratios"]]
        lines.append("")
    return lines


def _sw_table(sw: dict) -> list[str]:
    gpu = str(sw.get("device", "cpu")).startswith("cuda")
    title = "### Sliding-window inference, volume " + "x".join(str(v) for v in sw["volume"])
    if gpu:
        title += f", {sw['device']}, amp {sw.get('amp', 'none')}"
    lines = [title, ""]
    src = sw.get("settings_source")
    if src:
        lines += [f"Bundle inferer settings: {src}.", ""]
    mem_key, mem, fmt = ("peak_gpu_mb", "peak GPU memory", "{:.3f}") if gpu else ("peak_rss_mb", "peak RSS", "{:.1f}")
    what = "time (s, median)" if gpu else "wall time (s, median)"
    runs_cpu = [len(r["wall_s_runs"]) for r in sw["runs"] if r.get("wall_s_runs")]
    if not gpu and runs_cpu:
        lines += [f"Each pass a fresh process; {max(runs_cpu)} rounds over the settings, the models of a setting in "
                  "turn in each round; median pass, highest peak RSS.", ""]
    lines += [f"| Model | roi | sw_batch_size | overlap | {what} | {mem} (MB) | notes |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in sw["runs"]:
        lines.append(
            f"| {r['label']} | {'x'.join(str(v) for v in r['roi'])} | {r['sw_batch_size']} | {r['overlap']} | "
            f"{_f(r.get('wall_s'), fmt)} | {_f(r.get(mem_key), '{:.0f}')} | {r.get('note', '')} |")
    lines.append("")
    for k, v in (sw.get("best") or {}).items():
        lines.append(f"- fastest for {k}: roi {'x'.join(str(x) for x in v['roi'])}, sw_batch_size "
                     f"{v['sw_batch_size']}, overlap {v['overlap']}: {fmt.format(v['wall_s'])} s, "
                     f"{v[mem_key]:.0f} MB")
    lines.append("")
    return lines


def _training_tables(tr: dict) -> list[str]:
    gpu = str(tr.get("device", "cpu")).startswith("cuda")
    if gpu:
        mem_key, mem = "peak_gpu_mb", "peak GPU memory (MB)"
    else:
        mem_key, mem = "step_rss_growth_mb", "RSS growth in a step (MB)"
    lines = []
    for wl in tr["workloads"]:
        lines += [f"### {wl['name']}: {wl['description']}", "",
                  f"Input {'x'.join(str(v) for v in wl['input_shape'])}; {wl['loss']}; {wl['optimizer']}; "
                  f"{tr['device']}, amp {tr.get('amp', 'none')}.", "",
                  f"| Model | Params | step median (ms) | p90 (ms) | steps | samples/s | {mem} | notes |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in wl["results"]:
            st = r.get("step") or {}
            lines.append(f"| {r['label']} | {_params(r.get('params'))} | {_f(st.get('median_ms'))} | "
                         f"{_f(st.get('p90_ms'))} | {st.get('n', '–')} | {_f(r.get('samples_per_s'))} | "
                         f"{_f(r.get(mem_key), '{:.0f}')} | {'; '.join(r.get('notes', []))} |")
        labels = {r["model"]: r["label"] for r in wl["results"]}
        for q in wl.get("ratios", []):
            faster = "faster" if q["speedup"] >= 1 else "slower"
            factor = q["speedup"] if q["speedup"] >= 1 else 1 / q["speedup"]
            lines.append(f"- {labels[q['model']]} against {labels[q['versus']]}: {factor:.2f}x {faster} "
                         f"(speed-up {q['speedup']:.2f}x)")
        lines.append("")
    return lines


def _quality_table(q: dict) -> list[str]:
    budget = q.get("budget_s", q.get("budget_cpu_s"))
    clock = q.get("budget_clock", "process CPU time")
    cpu = clock == "process CPU time"
    what, column = ("CPU-seconds", "CPU time") if cpu else (f"s of {clock}", clock)
    lines = [f"### Quality at equal budget ({budget:.0f} {what} of training each)", "",
             f"Data: {q['data']}.", "",
             f"| Model | Params | steps | {column} (s) | wall time (s) | val Dice (mean) | per case |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in q["runs"]:
        used = r.get("budget_used_s", r.get("cpu_s"))
        per_case = ", ".join(f"{d:.3f}" for d in r.get("dice_per_case") or []) or r.get("note", "")
        lines.append(f"| {r['label']} | {_params(r.get('params'))} | {r['steps']} | {used:.0f} | "
                     f"{r['wall_s']:.0f} | {_f(r.get('dice_mean'), '{:.3f}')} | {per_case} |")
    lines.append("")
    return lines


def _gpu_line(env: dict) -> str:
    g = env.get("cuda_device")
    if not g:
        return ""
    def onoff(v) -> str:
        return "unknown" if v is None else "on" if v else "off"

    return (f"GPU: {g['gpu']} ({g['gpu_memory_gb']} GB, compute capability {g['compute_capability']}), driver "
            f"{g.get('driver') or '?'}, CUDA {g.get('cuda')}, cuDNN {g.get('cudnn')} (benchmark "
            f"{onoff(g.get('cudnn_benchmark'))}, TF32 convolutions {onoff(g.get('tf32_cudnn'))}, "
            f"TF32 matmul {onoff(g.get('tf32_matmul'))}); autocast: {env.get('amp', 'none')}. Timing: "
            "CUDA events around each call after a device synchronisation; peak memory: "
            "torch.cuda.max_memory_allocated.")


def markdown(report: dict) -> str:
    """The Markdown summary of a benchmark report (all modes that ran)."""
    env = report["environment"]
    lines = ["# U-Lite benchmark", "",
             f"Generated {report['created_utc']} by `{report['command']}`.", "",
             f"Machine: {env['cpu']}"
             + (f" ({env['cpu_capability']})" if env.get("cpu_capability") else "")
             + f", {env['cpu_count']} logical CPUs, {env.get('memory_gb', '?')} GB RAM; "
             f"torch {env['torch']} with {env['torch_threads']} threads, MONAI {env['monai']}, "
             f"ONNX Runtime {env['onnxruntime']}. CPU allocator: {env.get('allocator', 'default')} (every model "
             "alike)."
             + (f" Source: commit {env['git']['commit']}"
                + (f" with uncommitted changes in {', '.join(env['git']['networks_modified'])}"
                   if env["git"]["networks_modified"] else "") + "." if env.get("git") else ""),
             f"Load average (1/5/15 min) at start {report.get('load_average_start')}, at end "
             f"{report.get('load_average_end')}: other processes shared the CPUs, so compare figures within "
             "this run (ratios), not across machines.", ""]
    if env.get("cuda_device"):
        lines[-1:-1] = [_gpu_line(env)]
    if env.get("source_sha256"):
        lines[-1:-1] = [f"Package sources SHA-256 {env['source_sha256']}."]
    for run in report.get("earlier_runs", []):
        machine = f" on {run['machine']}" if run.get("machine") else ""
        lines += [f"Results of {', '.join(run['kept'])} are from another run: `{run['command']}` at "
                  f"{run['created_utc']}{machine} (load average {run.get('load_average_start')} to "
                  f"{run.get('load_average_end')}).", ""]
    if "speed" in report:
        lines += ["## Speed and memory", "",
                  "Latency: each round runs every model in turn, a burst of calls back to back (after warm-up). "
                  "bs1 median and p90: the calls after the first of each burst, the steady-state latency of a "
                  "model serving requests back to back. bs1 cold: the first call of each burst, which runs "
                  "after the other models have evicted this one's weights and activations from the CPU "
                  "caches. Ratios use the steady-state medians; the cold column gives them from the cold "
                  "calls. "
                  + ("Peak GPU memory: torch.cuda.max_memory_allocated during one call (one training step) minus "
                     "what was allocated before the model was built, plus the input: weights, input, activations "
                     "and output (for training also gradients and optimiser state). All models run in one process."
                     if str(report["speed"].get("device", "cpu")).startswith("cuda") else
                     "Peak RSS: a fresh child process per model builds it, warms up, resets the high-water mark "
                     "and runs the workload; the figure includes the Python/torch runtime and the weights."), ""]
        lines += _speed_tables(report["speed"])
    if "training_step" in report:
        lines += ["## Training step", "",
                  "One step: zero gradients, forward and loss (under autocast when amp is on), backward, optimiser "
                  "step (through a GradScaler for fp16), as MONAI's SupervisedTrainer runs it. All models of a "
                  "workload in one process, interleaved one step per model per round after warm-up steps; medians. "
                  "Speed-up = MONAI UNet's step time / U-Lite's.", ""]
        lines += _training_tables(report["training_step"])
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
        where = f"{speed['threads']} threads"
        if str(speed.get("device", "cpu")).startswith("cuda"):
            where = f"{speed['device']}, amp {speed.get('amp', 'none')}"
        ax.set_title(f"{dims}D {shape} ({where}); marker area ~ FLOPs")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    try:
        save_atomically(lambda tmp: fig.savefig(tmp, dpi=110), path)
    finally:
        plt.close(fig)
    return path


def plot_training(training: dict, path) -> Path:
    """Median step time per model, one panel per training workload (U-Lite red, MONAI blue); writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = training["workloads"] or [{"name": "none", "description": "", "results": []}]
    fig, axes = plt.subplots(1, len(wls), figsize=(5.5 * len(wls), 3.8), squeeze=False)
    for ax, wl in zip(axes[0], wls):
        rows = [r for r in wl["results"] if r.get("step")]
        ys = list(range(len(rows)))
        ax.barh(ys, [r["step"]["median_ms"] for r in rows],
                color=["tab:red" if r["family"] == "ulite" else "tab:blue" for r in rows], alpha=0.7)
        ax.set_yticks(ys, [r["label"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("training step, median (ms)")
        shape = "x".join(str(v) for v in wl.get("input_shape", []))
        ax.set_title(f"{wl['name']}: {shape}\n{training['device']}, amp {training.get('amp', 'none')}", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    try:
        save_atomically(lambda tmp: fig.savefig(tmp, dpi=110), path)
    finally:
        plt.close(fig)
    return path
