#!/usr/bin/env python
"""Infer latency of the U-Lite MONAI Label server, measured end to end through the real client.

Starts ``ulite_monai.label.serve`` on 127.0.0.1 (a free port) over a studies folder holding the given images,
sends one warm-up and ``--repeat`` timed infer requests per image, and prints client wall time and the
server's own stage latencies (pre-processing, inferer, post-processing, writer). Run with the project python;
the server and client run in the Label environment (``make label-venv``).

    .venv/bin/python scripts/label_latency.py                                     # a demo volume
    .venv/bin/python scripts/label_latency.py --image ../shared/data/real/lung2_image.nrrd
    .venv/bin/python scripts/label_latency.py --image a.nii.gz --image b.nrrd --repeat 5 --json out.json

Weights: freshly initialised ones of the bundle's ``network_def`` (latency does not depend on the weight
values), or with ``--bundle-weights`` the bundle's own ``models/model.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the Label server harness

from support.label import (  # noqa: E402
    REPO,
    LabelServer,
    label_env_problem,
    make_checkpoint,
)


def _image_id(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _demo_volume(folder: Path) -> Path:
    """The first unlabelled demo case (what the demo dataset calls imagesTs/test_000), generated on the spot."""
    import nibabel as nib

    from ulite_monai.data.demo import make_demo_case

    folder.mkdir(parents=True, exist_ok=True)
    image, _, affine = make_demo_case(20230616 + 10_000)
    path = folder / "demo_test_000.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", action="append", default=[], help="NIfTI/NRRD volume (repeatable); default: a demo volume")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--bundle", default=str(REPO / "bundles" / "ulite"))
    p.add_argument("--configs", default="", help="comma-separated config overrides for the app")
    p.add_argument("--bundle-weights", action="store_true", help="serve the bundle's models/model.pt")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args(argv)

    problem = label_env_problem()
    if problem:
        sys.exit(problem)

    with tempfile.TemporaryDirectory(prefix="ulite_label_latency_") as tmp:
        tmp = Path(tmp)
        images = [Path(i).resolve() for i in args.image] or [_demo_volume(tmp / "demo")]
        studies = tmp / "studies"
        studies.mkdir()
        for img in images:
            if not img.is_file():
                sys.exit(f"--image {img}: no such file")
            (studies / img.name).symlink_to(img)

        conf = {"bundle": args.bundle}
        if args.configs:
            conf["configs"] = args.configs
        srv = LabelServer(str(studies), tmp / "srv", conf=conf)
        srv.model_dir.mkdir(parents=True)
        bundle_model = Path(args.bundle) / "models" / "model.pt"
        if args.bundle_weights:
            if not bundle_model.is_file():
                sys.exit(f"--bundle-weights: {bundle_model} does not exist (train the bundle first)")
            weights = str(bundle_model)
        else:
            weights = "freshly initialised"
            make_checkpoint(args.bundle, srv.model_dir / "ulite.pt", args.configs)

        report = {"host": platform.node(), "cpus": os.cpu_count(), "weights": weights, "images": []}
        with srv:
            for img in images:
                iid = _image_id(img)
                srv.client("infer", iid, "--out", str(tmp / "warmup"))  # first request loads the network
                runs = [srv.client("infer", iid, "--out", str(tmp / f"out_{k}")) for k in range(args.repeat)]
                lat = [r["result"].get("latencies", {}) for r in runs]
                entry = {
                    "image": str(img),
                    "client_s": [round(r["seconds"], 3) for r in runs],
                    "client_median_s": round(statistics.median(r["seconds"] for r in runs), 3),
                }
                for stage in ("pre", "infer", "invert", "post", "write", "total"):
                    vals = [float(v[stage]) for v in lat if stage in v]
                    if vals:
                        entry[f"server_{stage}_median_s"] = round(statistics.median(vals), 3)
                report["images"].append(entry)

    print(f"U-Lite MONAI Label infer latency (CPU, {report['cpus']} cores; weights: {weights})")
    print(f"{'image':<40} {'client median s':>16} {'server pre':>11} {'infer':>8} {'post':>8} {'write':>8}")
    for e in report["images"]:
        print(f"{Path(e['image']).name:<40} {e['client_median_s']:>16.2f} {e.get('server_pre_median_s', 0):>11.2f} "
              f"{e.get('server_infer_median_s', 0):>8.2f} {e.get('server_post_median_s', 0):>8.2f} "
              f"{e.get('server_write_median_s', 0):>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
