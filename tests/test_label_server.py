"""MONAI Label app: a real server on 127.0.0.1 driven by the real ``MONAILabelClient``.

The server and the client run in the Label environment (``make label-venv``), inside a network namespace that
has only loopback (so start, infer and train provably download nothing); this file starts processes and checks
files. Locally the tests skip without that environment; under CI=true they fail.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from support.label import (
    REPO,
    LabelServer,
    ci_requires,
    label_env_problem,
    make_checkpoint,
    offline_network,
    offline_problem,
    run_label_python,
)

pytestmark = [pytest.mark.label, pytest.mark.slow, pytest.mark.timeout(900)]

BUNDLE = REPO / "bundles" / "ulite"

# Keeps the bundle's pipeline but makes it cheap enough for a test on two shared cores.
TEST_OVERRIDE = {
    "roi_size": [32, 32, 32],
    "patch_size": [32, 32, 32],
    "num_samples": 1,
    "val_interval": 1,
    "batch_size": 1,
    "cache_rate": 0.0,
    "num_workers": 0,
}


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _listeners(port: int) -> list[str]:
    """Addresses with a TCP socket listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr_hex, port_hex = fields[1].split(":")
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                raw = bytes.fromhex(addr_hex)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # kernel words, host order
                found.append(socket.inet_ntop(family, raw))
    return found


def _volume(path: Path, shape, affine, seed: int) -> None:
    """A small CT-like volume: soft tissue background, a bright ellipsoid, noise; int16 HU."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float32)
    c = (np.asarray(shape) - 1) / 2 + rng.uniform(-3, 3, size=3)
    r = np.asarray(shape) / rng.uniform(3.0, 4.5, size=3)
    blob = (((idx - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0) <= 1
    img = rng.normal(40, 25, size=shape) + 200 * blob - 800 * (idx[0] < 2)
    nib.save(nib.Nifti1Image(img.astype(np.int16), affine), str(path))
    return blob.astype(np.uint8)


def _affine(spacing, flip_x: bool, origin) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    theta = np.deg2rad(10)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    a[:3, :3] = rot @ np.diag([-1.0 if flip_x else 1.0, 1.0, 1.0]) @ a[:3, :3]
    a[:3, 3] = origin
    return a


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ci_requires(label_env_problem())
    ci_requires(offline_problem())
    root = tmp_path_factory.mktemp("label")
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    shapes = [(40, 36, 20), (36, 40, 18), (44, 36, 20), (38, 38, 16), (40, 40, 20)]
    for i, shape in enumerate(shapes):
        affine = _affine((1.6, 1.4, 2.5), flip_x=i % 2 == 0, origin=(-30.0 + i, 12.0, -40.0))
        label = _volume(studies / f"vol_{i}.nii.gz", shape, affine, seed=i)
        if i < 3:  # three labelled, two left to annotate
            nib.save(nib.Nifti1Image(label, affine), str(studies / "labels" / "final" / f"vol_{i}.nii.gz"))
    override = root / "test_override.json"
    override.write_text(json.dumps(TEST_OVERRIDE))

    srv = LabelServer(str(studies), root / "srv", conf={"bundle": str(BUNDLE), "configs": str(override)})
    # a starting checkpoint: the bundle's network, seeded initial weights calibrated so vol_1's label is not empty
    srv.model_dir.mkdir(parents=True)
    make_checkpoint(BUNDLE, srv.model_dir / "ulite.pt", str(override), calibrate_on=str(studies / "vol_1.nii.gz"))
    srv.studies_dir = studies
    srv.override = override
    # the server, its training subprocesses and the clients run with loopback only: nothing can be downloaded
    with offline_network(), srv:
        yield srv


def test_info_lists_model_and_labels(server):
    info = server.client("info")
    model = info["models"]["ulite"]
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    out = next(iter(meta["network_data_format"]["outputs"].values()))
    expected = {v.lower(): int(k) for k, v in out["channel_def"].items() if v.lower() != "background"}
    assert model["labels"] == expected
    assert model["type"] == "segmentation"
    assert model["dimension"] == 3
    assert "ulite" in info["trainers"]
    assert set(expected) <= set(info["labels"])
    assert _listeners(server.port) == ["127.0.0.1"]  # loopback only


def test_infer_returns_label_aligned_with_input(server, tmp_path):
    res = server.client("infer", "vol_1", "--out", str(tmp_path / "pred"))
    src = nib.load(str(server.studies_dir / "vol_1.nii.gz"))
    lab = nib.load(res["label"])
    assert lab.shape == src.shape
    np.testing.assert_allclose(lab.affine, src.affine, atol=1e-4)
    values = set(np.unique(np.asarray(lab.dataobj)).tolist())
    assert values <= {0, *server.client("info")["models"]["ulite"]["labels"].values()}
    assert res["result"]["checkpoint_sha256"] == _sha(server.model_dir / "ulite.pt")

    # voxel for voxel what the bundle's own pipeline gives in-process (no flip/transpose in the server path)
    ref = tmp_path / "ref.npy"
    run_label_python(
        "import sys, numpy as np\n"
        "from ulite_monai.bundle import Bundle\n"
        "pipe = Bundle(sys.argv[1], sys.argv[2]).pipeline(checkpoint=sys.argv[4], device='cpu', output_dir=sys.argv[6])\n"
        "np.save(sys.argv[5], np.asarray(pipe(sys.argv[3])['pred']).squeeze(0))\n",
        str(BUNDLE), str(server.override), str(server.studies_dir / "vol_1.nii.gz"),
        str(server.model_dir / "ulite.pt"), str(ref), str(tmp_path / "bundle_out"),
    )
    expected = np.load(ref)
    got = np.asarray(lab.dataobj)
    assert expected.shape == got.shape
    assert 0.05 < (got > 0).mean() < 0.95, "a label with structure, so that a flip or transpose would show"
    assert (expected == got).mean() >= 0.999


def test_eight_parallel_infers_all_succeed(server, tmp_path):
    res = server.client("parallel-infer", "vol_3", "-n", "8", "--out-dir", str(tmp_path))
    assert res["errors"] == []
    assert len(res["results"]) == 8
    arrays = [np.asarray(nib.load(r["label"]).dataobj) for r in res["results"]]
    src_shape = nib.load(str(server.studies_dir / "vol_3.nii.gz")).shape
    assert all(a.shape == src_shape for a in arrays)
    assert all(np.array_equal(a, arrays[0]) for a in arrays[1:])


def test_next_sample_and_save_label(server, tmp_path):
    first = server.client("next-sample", "--strategy", "first")
    assert first["id"] in {"vol_3", "vol_4"}  # only unlabelled images are offered
    label = np.zeros(nib.load(first["path"]).shape, np.uint8)
    label[5:15, 5:15, 4:10] = 1
    lab_file = tmp_path / "annotation.nii.gz"
    nib.save(nib.Nifti1Image(label, nib.load(first["path"]).affine), str(lab_file))
    saved = server.client("save-label", first["id"], str(lab_file))
    assert saved["image"] == first["id"]
    stored = server.studies_dir / "labels" / "final" / f"{first['id']}.nii.gz"
    assert stored.exists()
    assert np.array_equal(np.asarray(nib.load(str(stored)).dataobj), label)
    ds = server.client("datastore")
    assert "final" in ds["objects"][first["id"]]["labels"]
    again = server.client("next-sample", "--strategy", "first")
    assert again["id"] != first["id"] and again["id"] in {"vol_3", "vol_4"}


def test_train_then_infer_uses_new_checkpoint(server, tmp_path):
    before = _sha(server.model_dir / "ulite.pt")
    res = server.client("train", "--params", json.dumps({"max_epochs": 1, "val_split": 0.25}), "--wait", "600")
    final = res["final"]
    assert final["status"] == "DONE", final
    stats = server.client("info")["train_stats"]["ulite"]
    assert stats["epochs"] == 1
    assert stats["val_records"] >= 1 and stats["best_metric_epoch"] == 1  # validated, best model published
    assert stats["published_from"].endswith("model.pt")
    assert stats["train_records"] + stats["val_records"] >= 4  # 3 labelled at start + 1 saved by the previous test
    after = _sha(server.model_dir / "ulite.pt")
    assert after != before
    out = server.client("infer", "vol_0", "--out", str(tmp_path / "pred"))
    assert out["result"]["checkpoint_sha256"] == after
    assert Path(out["result"]["checkpoint"]) == server.model_dir / "ulite.pt"
    assert not any(server.model_dir.glob("ulite_run_*")), "run folders are cleaned up"
