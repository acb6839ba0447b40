"""Start the MONAI Label server with the U-Lite app (run it with the Label environment's python).

    .venv-label/bin/python -m ulite_monai.label.serve                      # demo NIfTI folder, 127.0.0.1:8000
    .venv-label/bin/python -m ulite_monai.label.serve --studies DIR --port 8001
    .venv-label/bin/python -m ulite_monai.label.serve --studies http://127.0.0.1:8042/dicom-web
    .venv-label/bin/python -m ulite_monai.label.serve --conf bundle bundles/ulite_2d --studies /path/to/images

It binds 127.0.0.1 unless ``--host`` says otherwise, puts this environment's ``bin`` (which holds dcmqi's
``itkimage2segimage``) first on PATH so MONAI Label downloads no tools, and then *becomes* the server
(``exec``), so the PID of this command is the server's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent


def demo_studies(dest: Path, bundle_dir: str | None = None, configs: str | None = None) -> Path:
    """A MONAI Label studies folder over the bundle's demo dataset: every image at the top, the labels of
    the training split under ``labels/final`` (so training works at once; the other cases are left to annotate).

    Files are symlinked, nothing is copied; the bundle's own loader generates the demo data on first use.
    """
    from ulite_monai.bundle import Bundle, load_datalist

    parser = Bundle(bundle_dir, configs).parser("train")
    dataset_dir, demo = parser.get_parsed_content("dataset_dir"), parser.get_parsed_content("demo_data")
    datalist = {split: load_datalist(dataset_dir, split, demo=demo) for split in ("training", "validation", "testing")}
    (dest / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for split in ("training", "validation", "testing"):
        for rec in datalist.get(split, []):
            image = Path(rec["image"]).resolve()
            link = dest / image.name
            if not link.is_symlink():
                link.symlink_to(image)
            if split == "training" and rec.get("label"):
                lab = dest / "labels" / "final" / image.name
                if not lab.is_symlink():
                    lab.symlink_to(Path(rec["label"]).resolve())
    return dest


def build_command(args: argparse.Namespace, python: str = sys.executable) -> list[str]:
    cmd = [python, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", args.studies,
           "--host", args.host, "--port", str(args.port)]
    for key, value in args.conf:
        cmd += ["--conf", key, value]
    return cmd


def server_env(env: dict | None = None) -> dict:
    """Environment for the server: this venv's bin first on PATH; no model zoo look-ups."""
    env = dict(os.environ if env is None else env)
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    # The server would otherwise read a stray ./.env file; keep its settings to what we pass.
    env.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
    return env


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", default=None,
                   help="folder of NIfTI/NRRD images, or a DICOMweb URL (default: the demo dataset)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="app option, e.g. --conf bundle bundles/ulite_2d (see ulite_monai/label/main.py)")
    p.add_argument("--demo-dir", default=str(Path.cwd() / "runs" / "label" / "studies"),
                   help="where the demo studies folder is made when --studies is not given")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    args = p.parse_args(argv)

    if args.studies is None:
        conf = dict(args.conf)
        args.studies = str(demo_studies(Path(args.demo_dir), conf.get("bundle"), conf.get("configs")))
    elif not args.studies.startswith(("http://", "https://")) and not os.path.isdir(args.studies):
        raise SystemExit(f"--studies {args.studies}: no such folder (give a folder of NIfTI images or a DICOMweb URL)")
    if args.studies.startswith(("http://", "https://")) and shutil.which("itkimage2segimage", path=server_env()["PATH"]) is None:
        raise SystemExit("DICOMweb needs dcmqi's itkimage2segimage on PATH: pip install dcmqi (make label-venv does).")

    cmd = build_command(args)
    print(" ".join(cmd), flush=True)
    if args.dry_run:
        return
    os.execvpe(cmd[0], cmd, server_env())


if __name__ == "__main__":
    main()
