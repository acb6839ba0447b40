#!/usr/bin/env python
"""Training-step time of U-Lite against MONAI's UNet, interleaved in one process (CPU or CUDA, optional AMP).

A step is forward, loss, backward and an AdamW step (with a GradScaler under fp16). Workloads:

  2d         8x3x256x256, the paper's widths (16..512), 1 output, Dice + BCE-with-logits (DiceCELoss sigmoid)
  3d-bundle  the 3D bundle's step: batch 2 x 2 samples = 4x1x48^3, widths 8..128, 2 outputs, the bundle's
             DiceCELoss (softmax, one-hot labels, no background)
  3d-96      4x1x96^3, the bundle's widths, 2 outputs, the same loss

Models: U-Lite with each ``axial_impl`` in ``--impls`` (``auto`` is what users get; the others show the
alternatives, see ulite_monai/networks/axial.py), and MONAI UNet(channels 16..256, strides 2, 2 residual
units). All models train the same batch; each round runs one step of every model in turn (interleaved, so
machine load affects them alike); the table gives the median step time and the ratio to MONAI UNet.

    python scripts/bench_train.py                                  # CPU: 2d and 3d-bundle
    python scripts/bench_train.py --device cuda --amp fp16         # CUDA: all three workloads
    python scripts/bench_train.py --impls auto,reference,merged,views --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

WORKLOADS = {
    "2d": dict(dims=2, batch=8, in_ch=3, out_ch=1, size=(256, 256), features=(16, 32, 64, 128, 256, 512)),
    "3d-bundle": dict(dims=3, batch=4, in_ch=1, out_ch=2, size=(48, 48, 48), features=(8, 16, 32, 64, 128)),
    "3d-96": dict(dims=3, batch=4, in_ch=1, out_ch=2, size=(96, 96, 96), features=(8, 16, 32, 64, 128)),
}
AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_models(spec: dict, impls: list[str], device: torch.device, unet_channels_last: bool,
                compile_models: bool) -> dict[str, torch.nn.Module]:
    from monai.networks.nets import UNet

    from ulite_monai.networks import ULite

    models = {}
    for impl in impls:
        torch.manual_seed(0)
        models[f"ulite[{impl}]"] = ULite(spec["dims"], spec["in_ch"], spec["out_ch"], features=spec["features"],
                                         axial_impl=impl).to(device)
    torch.manual_seed(0)
    unet = UNet(spec["dims"], spec["in_ch"], spec["out_ch"], channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2).to(device)
    if unet_channels_last:
        unet = unet.to(memory_format=torch.channels_last if spec["dims"] == 2 else torch.channels_last_3d)
    models["monai_unet"] = unet
    if compile_models:
        models = {k: torch.compile(m) for k, m in models.items()}
    return models


def make_step(net: torch.nn.Module, spec: dict, device: torch.device, amp: str, unet_channels_last: bool,
              is_unet: bool):
    """A no-argument callable doing one training step of ``net`` on a fixed batch; returns the loss."""
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(1)
    x = torch.randn((spec["batch"], spec["in_ch"]) + spec["size"], generator=g)
    if spec["out_ch"] == 1:
        loss_fn = DiceCELoss(sigmoid=True)
        y = (torch.rand((spec["batch"], 1) + spec["size"], generator=g) > 0.7).float()
    else:
        loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                             smooth_nr=1e-5, smooth_dr=1e-5)
        y = torch.randint(0, spec["out_ch"], (spec["batch"], 1) + spec["size"], generator=g).float()
    x, y = x.to(device), y.to(device)
    if is_unet and unet_channels_last:
        x = x.contiguous(memory_format=torch.channels_last if spec["dims"] == 2 else torch.channels_last_3d)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    dtype = AMP_DTYPES[amp]
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return float(loss.detach())

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_workload(name: str, args, device: torch.device) -> dict:
    spec = WORKLOADS[name]
    impls = [s for s in args.impls.split(",") if s]
    models = make_models(spec, impls, device, args.unet_channels_last, args.compile)
    steps = {k: make_step(m, spec, device, args.amp, args.unet_channels_last, k == "monai_unet")
             for k, m in models.items()}
    losses = {}
    for _ in range(args.warmup):
        for k, step in steps.items():
            losses[k] = step()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))  # alternate who runs after whom
        for k in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            losses[k] = steps[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    peak = {}
    if device.type == "cuda":  # one more step per model for its peak memory
        for k, step in steps.items():
            torch.cuda.reset_peak_memory_stats(device)
            step()
            peak[k] = torch.cuda.max_memory_allocated(device) / 2**20
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["monai_unet"]
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    impl_used = {}
    for k, m in models.items():
        base = getattr(m, "_orig_mod", m)
        if hasattr(base, "implementation"):
            impl_used[k] = base.implementation(device)
    shape = f"{spec['batch']}x{spec['in_ch']}x" + "x".join(str(s) for s in spec["size"])
    return {
        "workload": name, "input": shape, "features": list(spec["features"]),
        "models": {
            k: {"median_s": med[k], "min_s": min(times[k]), "times_s": times[k], "ratio_to_unet": med[k] / ref,
                "cpu_median_s": statistics.median(cpu[k]),
                "cpu_ratio_to_unet": statistics.median(cpu[k]) / statistics.median(cpu["monai_unet"]),
                "params": n_params[k], "impl": impl_used.get(k), "last_loss": losses[k],
                **({"peak_mib": peak[k]} if k in peak else {})}
            for k in times
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", default="none", choices=list(AMP_DTYPES))
    ap.add_argument("--workloads", default=None,
                    help="comma-separated subset of " + ",".join(WORKLOADS) + " (CPU default: 2d,3d-bundle; CUDA: all)")
    ap.add_argument("--impls", default="auto,reference", help="U-Lite axial_impl values to measure")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5 on CPU, 20 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1 on CPU, 5 on CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--unet-channels-last", action="store_true", help="also run MONAI UNet channels-last")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model (compile time not timed)")
    ap.add_argument("--default-allocator", action="store_true",
                    help="leave glibc malloc at its defaults (by default ulite_monai.utils.tune_cpu_allocator "
                         "is applied once, for every model alike)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available to this torch build.")
    if args.amp == "fp16" and device.type == "cpu":
        sys.exit("--amp fp16 is for CUDA; use --amp bf16 on the CPU.")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounds is None:
        args.rounds = 5 if device.type == "cpu" else 20
    if args.warmup is None:
        args.warmup = 1 if device.type == "cpu" else 5
    workloads = (args.workloads.split(",") if args.workloads
                 else (["2d", "3d-bundle"] if device.type == "cpu" else list(WORKLOADS)))
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        sys.exit(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}.")
    allocator = "default"
    if not args.default_allocator:
        from ulite_monai.utils import allocator_settings, tune_cpu_allocator

        tune_cpu_allocator()
        allocator = allocator_settings()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
            device_name = f"{names[0]} ({len(names)} logical CPUs)" if names else device_name
        except OSError:
            pass
    import monai

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    info = {
        "device": args.device, "device_name": device_name, "torch": torch.__version__, "monai": monai.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "threads": torch.get_num_threads(), "amp": args.amp, "compile": args.compile,
        "unet_channels_last": args.unet_channels_last, "allocator": allocator, "rounds": args.rounds,
        "warmup": args.warmup, "load_avg_before": load_before,
    }
    print(f"# {device_name} | torch {torch.__version__} | monai {monai.__version__} | threads {info['threads']} "
          f"| amp {args.amp} | load avg {load_before[0]:.2f}" if load_before else "")
    results = []
    for w in workloads:
        res = run_workload(w, args, device)
        results.append(res)
        print(f"\n{w} ({res['input']}, features {res['features']}): median of {args.rounds} interleaved steps")
        print(f"{'model':<22}{'impl':>10}{'params':>11}{'step':>12}{'vs UNet':>10}{'min':>12}{'CPU time':>12}"
              f"{'vs UNet':>10}")
        for k, m in res["models"].items():
            print(f"{k:<22}{m['impl'] or '-':>10}{m['params']:>11,}{m['median_s'] * 1000:>10.1f}ms"
                  f"{m['ratio_to_unet']:>9.2f}x{m['min_s'] * 1000:>10.1f}ms{m['cpu_median_s'] * 1000:>10.1f}ms"
                  f"{m['cpu_ratio_to_unet']:>9.2f}x" + (f"  peak {m['peak_mib']:.0f} MiB" if "peak_mib" in m else ""))
        sys.stdout.flush()
    info["load_avg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\nload average after: {info['load_avg_after']}; step: median wall time; min: fastest step; CPU time: "
          "median process CPU time per step (less sensitive to other processes than wall time); 'vs UNet' = "
          "U-Lite / MONAI UNet (below 1 is faster)")
    out = {"info": info, "results": results}
    print(json.dumps(out if args.json is None else info))
    if args.json:
        from ulite_monai.utils import save_json_atomically

        save_json_atomically(out, args.json)


if __name__ == "__main__":
    main()
