# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The MONAI Deploy App SDK application (``python -m ulite_monai.deploy``) and its MAP packaging inputs.

The application runs its operator graph (selection -> bundle inference -> SEG -> manifest) under the App SDK
on generated DICOM; its SEGs, labels and manifest rows must equal ``ulite-dicom``'s for the same input and
bundle. The packaging command is assembled (dry run) and its configuration read by the packager's own reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from support.dicom import dciodvfy_errors, make_standin_bundle, require_dciodvfy
from support.scaleout import cli_env, make_cohort, manifest_lines

from ulite_monai.batch.cli import main

FLAGS = ["--random-weights", "--no-progress", "--formats", "seg,nifti"]


def _run_app(inp: Path, out: Path, bundle: Path, log: Path, **env_extra) -> int:
    env = cli_env()
    env.update(ULITE_BUNDLE=str(bundle), ULITE_RANDOM_WEIGHTS="1", ULITE_FORMATS="seg,nifti", **env_extra)
    with open(log, "w") as f:
        return subprocess.run([sys.executable, "-m", "ulite_monai.deploy", "-i", str(inp), "-o", str(out)],
                              stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(out.parent), timeout=600).returncode


@pytest.mark.slow
def test_deploy_app_seg_equals_ulite_dicom(tmp_path):
    inp = make_cohort(tmp_path)
    bundle = make_standin_bundle(tmp_path / "bundle")
    batch, app = tmp_path / "batch", tmp_path / "app"
    assert main([str(inp), str(batch), "--bundle", str(bundle), *FLAGS]) == 1  # the damaged series fails
    log = tmp_path / "app.log"
    assert _run_app(inp, app, bundle, log) == 0, log.read_text()[-3000:]
    assert "Graph execution finished" in log.read_text()  # it ran as an App SDK (Holoscan) graph
    rb = {r["key"]: r for r in manifest_lines(batch)}
    ra = {r["key"]: r for r in manifest_lines(app)}
    assert set(ra) == set(rb)
    n_seg = 0
    for key, row in rb.items():
        other = ra[key]
        strip = ("timings_s", "finished_at")
        assert {k: v for k, v in row.items() if k not in strip} == {k: v for k, v in other.items() if k not in strip}
        for kind, rel in (row.get("outputs") or {}).items():
            if kind == "seg":
                a, b = pydicom.dcmread(batch / rel), pydicom.dcmread(app / rel)
                np.testing.assert_array_equal(a.pixel_array, b.pixel_array)
                ref = [sorted(x.ReferencedSOPInstanceUID
                              for x in d.ReferencedSeriesSequence[0].ReferencedInstanceSequence) for d in (a, b)]
                assert ref[0] == ref[1] and a.FrameOfReferenceUID == b.FrameOfReferenceUID
                assert [s.SegmentLabel for s in a.SegmentSequence] == [s.SegmentLabel for s in b.SegmentSequence]
                assert "MONAI Deploy" in str(b.SoftwareVersions)
                n_seg += 1
            elif kind == "nifti":
                import nibabel as nib

                np.testing.assert_array_equal(np.asarray(nib.load(batch / rel).dataobj),
                                              np.asarray(nib.load(app / rel).dataobj))
    assert n_seg == 6
    statuses = sorted(r["status"] for r in ra.values())
    assert statuses.count("done") == 7 and "empty" in statuses and "failed" in statuses
    require_dciodvfy()
    seg = next(app / r["outputs"]["seg"] for r in ra.values() if "seg" in (r.get("outputs") or {}))
    assert dciodvfy_errors(seg) == []
    assert not (app / ".tmp").exists()


def test_model_path_resolution(tmp_path):
    from ulite_monai.deploy.app import resolve_checkpoint

    assert resolve_checkpoint(None) is None and resolve_checkpoint(tmp_path / "none") is None
    (tmp_path / "m" / "model").mkdir(parents=True)
    ckpt = tmp_path / "m" / "model" / "model.pt"  # the MAP layout: /opt/holoscan/models/<name>/<file>
    ckpt.write_bytes(b"x")
    assert resolve_checkpoint(tmp_path / "m") == ckpt and resolve_checkpoint(ckpt) == ckpt
    (tmp_path / "m" / "other.pth").write_bytes(b"y")
    with pytest.raises(ValueError, match="several checkpoints"):
        resolve_checkpoint(tmp_path / "m")


def test_map_packaging_inputs_and_command(tmp_path, capsys):
    from holoscan_cli.packager.config_reader import ApplicationConfiguration

    from ulite_monai.deploy.package import main as package_main

    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    work = tmp_path / "map"
    assert package_main(["--model", str(model), "--work", str(work), "--tag", "ulite-seg:9.9", "--dry-run"]) == 0
    cmd = capsys.readouterr().out.strip().split()
    assert cmd[0].endswith("monai-deploy") and cmd[1] == "package" and cmd[2] == str(work / "app")
    assert cmd[cmd.index("-t") + 1] == "ulite-seg:9.9" and cmd[cmd.index("--platform") + 1] == "x86_64"
    assert cmd[cmd.index("-m") + 1] == str(model) and cmd[cmd.index("--add") + 1] == str(work / "lib")
    app = work / "app"
    assert (app / "__main__.py").read_text().count("from ulite_monai.deploy.app import main") == 1
    assert (app / "bundle" / "configs" / "inference.json").is_file() and not (app / "bundle" / "models").exists()
    assert json.loads((app / "series_selection.json").read_text())["selections"]
    reqs = (app / "requirements.txt").read_text()
    assert all(p in reqs for p in ("torch", "monai", "highdicom", "SimpleITK", "pydicom"))
    assert (work / "lib" / "ulite_monai" / "deploy" / "app.py").is_file()
    assert not list((work / "lib").rglob("__pycache__"))
    conf = ApplicationConfiguration()  # the packager's own reader and checks
    conf.read(Path(cmd[cmd.index("-c") + 1]))
    assert conf.title().startswith("ulite-monai")
    # the staged sources are importable on their own (what the image's PYTHONPATH holds)
    r = subprocess.run([sys.executable, "-c", "import ulite_monai.deploy.package as p; print(p.__file__)"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(work / "lib")},
                       cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0 and r.stdout.strip().startswith(str(work / "lib")), r.stdout + r.stderr[-2000:]
