#!/usr/bin/env python
# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Time the bundle's sliding-window inferer at several roi / ``sw_batch_size`` settings on real scans.

Each scan goes through the bundle's own ``inference.json`` preprocessing (SITK reader, RAS, 3 mm resampling,
intensity window, foreground crop), so the inferer sees what it sees in production, not a synthetic stress
volume. For every setting the script prints the inferer's input size, the number of windows, the median time of
``--repeats`` calls (interleaved with the other settings) and how many voxels' labels differ from the first
setting's (windows of other sizes give the network other context and padding; for a network that was not trained
on such scans, e.g. the demo's, that is not a handful). Accuracy is for ``evaluate.json`` on labelled data.

Usage::

    python scripts/inferer_settings.py ../shared/data/real/lung1_image.nrrd ../shared/data/real/lung2_image.nrrd \\
        --settings 64x2 96x2 128x2 128x2fit --repeats 5
    # on a GPU machine without the scans: random volumes of their inferer-input sizes
    python scripts/inferer_settings.py --shape 98x77x79 --shape 108x102x101 --shape 200x180x160 --device cuda \\
        --settings 64x2 128x2 128x2fit 128x8fit

The network is the bundle's (``models/model.pt`` after ``make demo``; random weights without one, which times the
same). ``--device cuda`` uses the GPU (with the bundle's fp16 autocast).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "ulite" / "configs"


def _windows(shape, roi, overlap: float) -> int:
    """How many windows MONAI's sliding window takes over ``shape`` (an axis shorter than the window is padded)."""
    n = 1
    for s, r in zip(shape, roi):
        n *= 1 if s <= r else math.ceil((s - r) / max(int(r * (1 - overlap)), 1)) + 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scans", nargs="*", help="image files or DICOM series folders")
    ap.add_argument("--shape", action="append", default=[], metavar="DxHxW",
                    help="also time a random volume of this inferer-input size (no scan needed, e.g. on a GPU "
                         "machine without the data: 98x77x79 and 108x102x101 are lung1 and lung2 after the "
                         "bundle's preprocessing); repeatable")
    ap.add_argument("--settings", nargs="+", default=["64x2", "128x2", "128x2fit"],
                    help="ROIxSW_BATCH, e.g. 64x2 (a cube of side ROI); a 'fit' suffix uses the bundle's "
                         "FitSlidingWindowInferer (windows capped by the image size rounded up to 16)")
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if not args.scans and not args.shape:
        ap.error("give scans, --shape DxHxW, or both")

    import torch
    from monai.inferers import SlidingWindowInferer

    from ulite_monai.bundle import Bundle, FitSlidingWindowInferer

    ckpt = REPO / "bundles" / "ulite" / "models" / "model.pt"
    if not ckpt.exists():
        print("no models/model.pt: random weights (make demo trains one); the timings are the same", file=sys.stderr)
    # the bundle's own network (fused as configured) and preprocessing, through the bundle layer
    pipe = Bundle(REPO / "bundles" / "ulite").pipeline(device=args.device, random_weights=not ckpt.exists(),
                                                      quiet=True)
    net, device, amp = pipe.network, pipe.device, pipe.autocast_enabled
    settings = []
    for s in args.settings:
        fit = s.lower().endswith("fit")
        roi, swb = (int(v) for v in s.lower().removesuffix("fit").split("x"))
        settings.append((roi, swb, fit))
    print(f"device {device} amp {amp} overlap {args.overlap} torch {torch.__version__} "
          f"threads {torch.get_num_threads()}")
    inputs = [(Path(scan).name, scan) for scan in args.scans]
    inputs += [(f"random {s}", tuple(int(v) for v in s.lower().split("x"))) for s in args.shape]
    for name, source in inputs:
        if isinstance(source, tuple):
            image = torch.rand((1, 1, *source), generator=torch.Generator().manual_seed(0)).to(device)
        else:
            image = pipe.preprocess(source)[pipe.info.image_key].unsqueeze(0).to(device)
        shape = tuple(image.shape[2:])
        inferers = [(FitSlidingWindowInferer if f else SlidingWindowInferer)(
            roi_size=(r,) * 3, sw_batch_size=b, overlap=args.overlap, mode="gaussian") for r, b, f in settings]
        times: list[list[float]] = [[] for _ in settings]
        labels = [None] * len(settings)
        with torch.inference_mode(), pipe.autocast():
            for rep in range(args.repeats + 1):  # the first round warms up
                for i, inf in enumerate(inferers):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = inf(image, net)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if rep:
                        times[i].append(time.perf_counter() - t0)
                    else:
                        labels[i] = out.max(1).indices.cpu()  # torch.argmax over channels is slow on the CPU
        print(f"{name}: inferer input {'x'.join(map(str, shape))} ({image.numel() / 1e6:.2f} M voxels)")
        for i, (r, b, f) in enumerate(settings):
            differ = int((labels[i] != labels[0]).sum())
            win = inferers[i].fitted_roi(shape) if f else (r,) * 3
            print(f"  roi {r:3d}{' fit' if f else '    '} sw_batch {b}: {'x'.join(map(str, win))} windows: "
                  f"{_windows(shape, win, args.overlap):3d}, "
                  f"{statistics.median(times[i]) * 1e3:8.1f} ms (median of {args.repeats}), "
                  f"{differ} voxels labelled differently from the first setting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
