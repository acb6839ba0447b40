"""A small command line over ``monailabel.client.MONAILabelClient`` (scripts, tests, latency checks).

    python -m ulite_monai.label.lib.client --server http://127.0.0.1:8000 info
    python -m ulite_monai.label.lib.client infer IMAGE_ID --out label.nii.gz
    python -m ulite_monai.label.lib.client parallel-infer IMAGE_ID -n 8 --out-dir labels/
    python -m ulite_monai.label.lib.client train --params '{"max_epochs": 2}' --wait 600
    python -m ulite_monai.label.lib.client save-label IMAGE_ID label.nii.gz
    python -m ulite_monai.label.lib.client next-sample --strategy first
    python -m ulite_monai.label.lib.client datastore

Each command prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from monailabel.client import MONAILabelClient

MODEL = "ulite"


def _infer(server: str, image: str, out: str, params: dict | None = None, model: str = MODEL) -> dict[str, Any]:
    """One infer request with its own client (the client keeps per-instance headers: one per thread)."""
    with tempfile.TemporaryDirectory() as tmp:
        client = MONAILabelClient(server, tmpdir=tmp)
        t0 = time.perf_counter()
        label, result = client.infer(model, image, params or {})
        seconds = time.perf_counter() - t0
        if not label:
            raise RuntimeError(f"infer {image}: the server returned no label file ({result})")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        ext = ".nii.gz" if label.endswith(".nii.gz") else os.path.splitext(label)[1]
        final = out if out.endswith((".nii.gz", ".nii", ".nrrd")) else out + ext
        shutil.move(label, final)
    return {"image": image, "label": final, "seconds": seconds, "result": result}


def _wait_train(client: MONAILabelClient, timeout: float) -> dict[str, Any]:
    deadline = time.time() + timeout
    status: dict = {}
    while time.time() < deadline:
        status = client.train_status()
        if status.get("status") not in ("SUBMITTED", "RUNNING", "QUEUED", None):
            return status
        time.sleep(1.0)
    raise TimeoutError(f"training still {status.get('status')} after {timeout} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=MODEL)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info")
    sub.add_parser("datastore")
    s = sub.add_parser("infer")
    s.add_argument("image")
    s.add_argument("--out", required=True)
    s.add_argument("--params", default="{}")
    s = sub.add_parser("parallel-infer")
    s.add_argument("image")
    s.add_argument("-n", type=int, default=8)
    s.add_argument("--out-dir", required=True)
    s = sub.add_parser("train")
    s.add_argument("--params", default="{}")
    s.add_argument("--wait", type=float, default=0, help="seconds to wait for the run to finish (0: return at once)")
    s = sub.add_parser("save-label")
    s.add_argument("image")
    s.add_argument("label")
    s.add_argument("--tag", default="final")
    s = sub.add_parser("next-sample")
    s.add_argument("--strategy", default="random")
    args = p.parse_args(argv)

    client = MONAILabelClient(args.server)
    if args.cmd == "info":
        out: Any = client.info()
    elif args.cmd == "datastore":
        out = client.datastore()
    elif args.cmd == "infer":
        out = _infer(args.server, args.image, args.out, json.loads(args.params), args.model)
    elif args.cmd == "parallel-infer":
        os.makedirs(args.out_dir, exist_ok=True)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.n) as pool:
            futures = [
                pool.submit(_infer, args.server, args.image, os.path.join(args.out_dir, f"label_{i}"), None, args.model)
                for i in range(args.n)
            ]
            results, errors = [], []
            for f in futures:
                try:
                    results.append(f.result())
                except Exception as e:  # noqa: BLE001 - every failure is reported, not just the first
                    errors.append(f"{type(e).__name__}: {e}")
        out = {"results": results, "errors": errors, "wall_seconds": time.perf_counter() - t0}
    elif args.cmd == "train":
        out = {"start": client.train_start(args.model, json.loads(args.params))}
        if args.wait:
            out["final"] = _wait_train(client, args.wait)
    elif args.cmd == "save-label":
        out = client.save_label(args.image, args.label, tag=args.tag)
    elif args.cmd == "next-sample":
        out = client.next_sample(args.strategy, {})
    json.dump(out, sys.stdout, default=str)
    sys.stdout.write("\n")
    return 1 if isinstance(out, dict) and out.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
