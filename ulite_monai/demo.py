# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""`make demo`: the network at a glance, then the bundle's demo (training + inference on the demo data)."""

from __future__ import annotations

import argparse
import time

import torch

from ulite_monai.networks import ULite, fuse_ulite


def _median_ms(fn, x, repeats: int = 10) -> float:
    with torch.inference_mode():
        for _ in range(2):
            fn(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    times.sort()
    return 1000.0 * times[len(times) // 2]


def network_summary(repeats: int = 10) -> None:
    """Build the paper's 2D net and the default 3D net, run each on a sample, print shapes, params, latency."""
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dims, in_ch, out_ch, shape in ((2, 3, 1, (1, 3, 256, 256)), (3, 1, 2, (1, 1, 96, 96, 96))):
        net = ULite(dims, in_ch, out_ch).eval()
        fused = fuse_ulite(net)
        x = torch.randn(*shape)
        with torch.inference_mode():
            y = net(x)
            err = ((fused(x) - y).abs().max() / y.abs().max()).item()
        n = sum(p.numel() for p in net.parameters())
        print(
            f"ULite {dims}D {in_ch}->{out_ch}: {n:,} parameters; input {tuple(x.shape)} -> output {tuple(y.shape)}; "
            f"latency bs1 unfused {_median_ms(net, x, repeats):.1f} ms, fused {_median_ms(fused, x, repeats):.1f} ms "
            f"(fused rel. diff {err:.1e})"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--network-only", action="store_true", help="only the network summary")
    parser.add_argument("--repeats", type=int, default=10)
    args, rest = parser.parse_known_args(argv)
    network_summary(args.repeats)
    if args.network_only:
        return
    try:
        from ulite_monai import demo_bundle
    except ImportError:
        print("(bundle demo not available in this version)")
        return
    demo_bundle.main(rest)


if __name__ == "__main__":
    main()
