#!/usr/bin/env python
"""Quick CPU speed check of U-Lite's inference paths against MONAI's UNet (one run, interleaved in bursts).

Prints bs1 and bs8 latency at 3x256x256 (2D, 3->1) and bs1 at 1x1x128^3 (3D, 1->2) for:
  unfused   ULite in eval mode, NCHW, reference structure
  default   the default inference path (fused: BN folded, axial blocks merged, channels-last)
  onnxrt    ONNX Runtime on the exported fused network
  monai_unet  monai.networks.nets.UNet(channels 16..256, strides 2, num_res_units 2)
The full benchmark CLI is `python -m ulite_monai.bench`.

    python scripts/bench_speed.py [--repeats 15] [--threads N] [--no-3d] [--device cuda --amp fp16]

On CUDA every network is built (and fused) on the CPU, then moved; ONNX Runtime (a CPU runtime) is left out,
and each call is timed with CUDA events after a device synchronisation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch


def build(dims: int, in_ch: int, out_ch: int, onnx_dir: str, device: torch.device | None = None):
    from monai.networks.nets import UNet

    from ulite_monai.networks import ULite, export_onnx, inference_network, onnx_session

    device = device or torch.device("cpu")
    torch.manual_seed(0)
    net = ULite(dims, in_ch, out_ch, axial_impl="reference").eval()  # the reference code's computation
    default = inference_network(net)  # what the bundle / batch / label paths use (fused on the CPU, then moved)
    unet = UNet(dims, in_ch, out_ch, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2).eval()
    models = {"unfused": net.to(device), "default": default.to(device)}
    if device.type == "cpu":
        path = export_onnx(net, os.path.join(onnx_dir, f"ulite{dims}d.onnx"))
        sess = onnx_session(path, threads=torch.get_num_threads())
        models["onnxrt"] = lambda x: torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
    models["monai_unet"] = unet.to(device)
    return models


def run(models: dict, x: torch.Tensor, repeats: int, burst: int = 3,
        amp: str = "none") -> tuple[dict[str, float], dict[str, float]]:
    """Median latency (ms) per model: steady state and cold.

    Interleaved as in ``python -m ulite_monai.bench`` (:func:`ulite_monai.bench.speed.interleave`): each round
    runs every model in turn, ``burst`` calls back to back. The first call of a burst follows the other models
    (their data has evicted this model's from the caches): the *cold* figure. The others are the steady state
    of a model serving requests back to back (the main figure).
    """
    from ulite_monai.bench.device import Timer, autocast
    from ulite_monai.bench.speed import interleave

    with torch.inference_mode(), autocast(x.device, amp):
        calls = {name: (lambda fn=fn: fn(x)) for name, fn in models.items()}
        for call in calls.values():  # warm-up
            call()
            call()
        times, cold = interleave(calls, {k: repeats for k in calls}, {k: burst for k in calls}, Timer(x.device))
    return ({k: 1000 * statistics.median(v) for k, v in times.items()},
            {k: 1000 * statistics.median(v) for k, v in cold.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-3d", action="store_true")
    ap.add_argument("--burst", type=int, default=3, help="calls per model per round; the first is the cold call")
    ap.add_argument("--default-allocator", action="store_true",
                    help="leave glibc malloc at its defaults (the inference paths tune it; see tune_cpu_allocator)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"], help="autocast dtype (CUDA only)")
    args = ap.parse_args()
    from ulite_monai.bench.device import check_amp, resolve

    try:
        device = resolve(args.device)
        amp = check_amp(device, args.amp)
    except ValueError as e:
        raise SystemExit(f"bench_speed.py: {e}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.default_allocator:
        os.environ["ULITE_TUNE_ALLOCATOR"] = "0"
    from ulite_monai.utils import allocator_settings, tune_cpu_allocator

    tune_cpu_allocator()  # before any model runs, so every model runs with the same allocator
    where = f"threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.2f}, allocator: {allocator_settings()}"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, amp {amp}"
        torch.backends.cudnn.benchmark = True
    print(f"torch {torch.__version__}, {where}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models2d = build(2, 3, 1, tmp, device)
        for bs in (1, 8):
            steady, cold = run(models2d, torch.randn(bs, 3, 256, 256, device=device),
                               args.repeats if bs == 1 else max(3, args.repeats // 3), args.burst, amp)
            rows.append((f"2D bs{bs} 3x256x256", steady))
            rows.append(("  cold calls", cold))
        if not args.no_3d:
            models3d = build(3, 1, 2, tmp, device)
            steady, cold = run(models3d, torch.randn(1, 1, 128, 128, 128, device=device), max(3, args.repeats // 3), 2,
                               amp)
            rows += [("3D bs1 1x128^3", steady), ("  cold calls", cold)]
    names = list(rows[0][1])
    print(f"{'input':<22}" + "".join(f"{n:>12}" for n in names) + f"{'unfused/default':>17}{'unet/default':>14}")
    for label, res in rows:
        print(
            f"{label:<22}" + "".join(f"{res[n]:>10.1f}ms" for n in names)
            + f"{res['unfused'] / res['default']:>16.2f}x{res['monai_unet'] / res['default']:>13.2f}x"
        )
    print(f"steady state: median of the calls after the first in each burst of {args.burst}; cold: the first calls")


if __name__ == "__main__":
    main()
