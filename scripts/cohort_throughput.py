# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Series per minute on a generated cohort: the plain run, Ray with 1/2/4 workers, and static shards.

Example::

    python scripts/cohort_throughput.py --series 40 --shape 40 192 192 --workers 1 2 4 --shards 2

Writes ``--series`` CT series into ``--workdir`` and segments them with the bundle (foreground-probe weights, so
every series gets a SEG, NIfTI and QC preview) once per configuration, each as its own ``ulite-dicom`` process,
as a user would run it: ``plain`` (one process, read-ahead), ``ray-N`` (``--ray --workers N``: a private Ray
instance on this machine, N actors each holding the model) and ``shards-N`` (N shard processes started together
plus ``ulite-dicom merge``). For each it records the process wall time, the batch loop time, series/min over
both, Ray's start-up (connecting, first worker ready) and the 1-minute load average sampled during the run.
Every run's results are checked against the plain run's (same manifest rows, voxel-identical labels and SEGs).
Prints one JSON object (and a Markdown table with ``--table``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the synthetic series writers live with the tests

from support.dicom_write import write_dicom_series  # noqa: E402
from support.phantoms import body_phantom, foreground_probe_checkpoint  # noqa: E402


class LoadSampler(threading.Thread):
    """Samples the 1-minute load average every ``every_s`` seconds."""

    def __init__(self, every_s: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.every_s, self.samples, self._halt = every_s, [], threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(os.getloadavg()[0])
            self._halt.wait(self.every_s)

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        s = self.samples or [os.getloadavg()[0]]
        return {"mean": round(sum(s) / len(s), 2), "max": round(max(s), 2)}


def _cli(args: list, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ulite_monai.batch", *map(str, args)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=env, cwd=str(REPO))


def _rows(out: Path) -> dict:
    return {r["key"]: r for r in (json.loads(ln) for ln in (out / "manifest.jsonl").read_text().splitlines() if ln)}


def _check_same(ref: Path, out: Path) -> str:
    """'identical' when ``out`` has the plain run's rows (timings aside) and voxel-identical outputs."""
    import nibabel as nib
    import numpy as np
    import pydicom

    a, b = _rows(ref), _rows(out)
    if set(a) != set(b):
        return f"different keys: {sorted(set(a) ^ set(b))[:3]}"
    for k in a:
        ra, rb = ({x: y for x, y in r.items() if x not in ("finished_at", "timings_s")} for r in (a[k], b[k]))
        if ra != rb:
            return f"row differs: {k}"
        for rel in (a[k].get("outputs") or {}).values():
            if rel.endswith(".nii.gz") and not np.array_equal(np.asarray(nib.load(ref / rel).dataobj),
                                                              np.asarray(nib.load(out / rel).dataobj)):
                return f"label differs: {rel}"
            if rel.endswith(".seg.dcm") and not np.array_equal(pydicom.dcmread(ref / rel).pixel_array,
                                                               pydicom.dcmread(out / rel).pixel_array):
                return f"SEG differs: {rel}"
    return "identical"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--series", type=int, default=40)
    p.add_argument("--shape", type=int, nargs=3, default=(40, 192, 192), metavar=("Z", "Y", "X"))
    p.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 2.5), metavar=("X", "Y", "Z"))
    p.add_argument("--bundle", type=Path, default=REPO / "bundles" / "ulite")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4], help="Ray pool sizes to run")
    p.add_argument("--shards", type=int, nargs="*", default=[2], help="shard counts to run (processes together)")
    p.add_argument("--no-plain", action="store_true")
    p.add_argument("--formats", default="seg,nifti,qc")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--table", action="store_true", help="also print a Markdown table")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ulite-cohort-"))
    inp = work / "in"
    t0 = time.perf_counter()
    if not inp.exists():
        for i in range(args.series):
            write_dicom_series(body_phantom(tuple(args.shape), seed=i), inp / f"series_{i:03d}",
                               origin=(-0.5 * args.shape[2] * args.spacing[0], -0.5 * args.shape[1] * args.spacing[1],
                                       -300.0 + i), spacing=args.spacing, rescale=(1.0, -1024.0), series_number=i + 1)
    gen_s = time.perf_counter() - t0
    ckpt = foreground_probe_checkpoint(args.bundle, work / "probe.pt")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    base = ["--bundle", args.bundle, "--checkpoint", ckpt, "--formats", args.formats, "--no-progress",
            "--device", "cpu"]
    runs: dict[str, dict] = {}
    plan = ([] if args.no_plain else [("plain", None)]) + [(f"ray-{w}", w) for w in args.workers] + \
        [(f"shards-{n}", n) for n in args.shards]
    for name, n in plan:
        out = work / f"out_{name}"
        shutil.rmtree(out, ignore_errors=True)
        load = LoadSampler()
        load.start()
        load_start = os.getloadavg()[0]
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        if name == "plain":
            procs = [_cli([inp, out, *base, "--threads", cores], work / f"{name}.log", env)]
        elif name.startswith("ray"):
            threads = max(1, cores // n)
            procs = [_cli([inp, out, *base, "--ray", "--workers", n, "--cpus-per-worker", 1, "--threads", threads],
                          work / f"{name}.log", env)]
        else:
            threads = max(1, cores // n)
            procs = [_cli([inp, out, *base, "--threads", threads, "--num-shards", n, "--shard-id", k],
                          work / f"{name}-{k}.log", env) for k in range(n)]
        rcs = [pr.wait() for pr in procs]
        if name.startswith("shards"):
            rcs.append(subprocess.run([sys.executable, "-m", "ulite_monai.batch", "merge", str(out)],
                                      capture_output=True, env=env, cwd=str(REPO)).returncode)
        wall = time.perf_counter() - t
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        figures = {"rc": rcs, "wall_s": round(wall, 2), "series_per_minute_wall": round(60 * args.series / wall, 2),
                   "load_average_1min": {"start": round(load_start, 2), **load.stop()},
                   # CPU time of the run's processes that were waited for (the plain and shard processes; a Ray
                   # instance's workers are counted only as far as their parents reaped them)
                   "cpu_s": round(cpu_s, 1)}
        if name.startswith("shards"):
            s = json.loads((out / "batch_summary.json").read_text())
            sh = s.get("shards") or {}
            figures.update(series_per_minute_loop=sh.get("series_per_minute_combined"), loop_s=sh.get("span_s"),
                           counts=s["counts"])
        else:
            s = json.loads((out / "batch_summary.json").read_text())
            rows = [r for r in _rows(out).values() if "timings_s" in r]
            figures.update(series_per_minute_loop=s["series_per_minute"], loop_s=s["loop_s"], counts=s["counts"],
                           mean_model_s=round(sum(r["timings_s"]["model"] for r in rows) / max(1, len(rows)), 3),
                           mean_series_s=round(sum(r["timings_s"]["total"] for r in rows) / max(1, len(rows)), 3))
            if "engine" in s:
                e = s["engine"]
                figures.update(ray_connect_s=e["connect_s"], ray_first_series_s=e["connect_to_first_series_s"],
                               workers_lost=e["workers_lost"], threads_per_worker=max(1, cores // n),
                               driver_commit_s_per_series=round(e.get("driver_commit_s", 0) / args.series, 4))
            figures["mean_stage_s"] = {k: round(sum(r["timings_s"].get(k, 0) for r in rows) / max(1, len(rows)), 3)
                                       for k in ("read", "preprocess", "model", "postprocess", "write", "wait")}
        figures["results_vs_plain"] = _check_same(work / "out_plain", out) if name != "plain" and \
            (work / "out_plain").exists() else None
        runs[name] = figures
        print(f"{name}: {json.dumps(figures)}", file=sys.stderr)
    result = {"series": args.series, "shape_zyx": list(args.shape), "cores": cores, "generate_s": round(gen_s, 1),
              "bundle": str(args.bundle), "formats": args.formats, "runs": runs}
    plain = runs.get("plain")
    if plain:
        for name, r in runs.items():
            if name != "plain":
                r["wall_vs_plain"] = round(r["wall_s"] / plain["wall_s"], 3)
                if r.get("loop_s") and plain.get("loop_s"):
                    r["loop_vs_plain"] = round(r["loop_s"] / plain["loop_s"], 3)
    print(json.dumps(result, indent=2))
    if args.table:
        print("\n| run | series/min (loop) | series/min (wall) | wall s | loop s | Ray start s | load avg mean/max |"
              " same results |\n|---|---:|---:|---:|---:|---:|---|---|")
        for name, r in runs.items():
            la = r["load_average_1min"]
            print(f"| {name} | {r.get('series_per_minute_loop')} | {r['series_per_minute_wall']} | {r['wall_s']} | "
                  f"{r.get('loop_s')} | {r.get('ray_first_series_s', '')} | {la['mean']}/{la['max']} | "
                  f"{r.get('results_vs_plain') or 'reference'} |")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
