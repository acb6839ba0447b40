"""Fast checks of the Label app's pieces that need no MONAI Label install (run in the project environment)."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch

from ulite_monai.label.lib.bundle import BundleSource
from ulite_monai.label.lib.checkpoint import (
    file_digest,
    load_state_dict,
    read_checkpoint,
)
from ulite_monai.label.serve import main as serve_main
from ulite_monai.label.testing import REPO

BUNDLE = REPO / "bundles" / "ulite"


def test_bundle_source_reads_labels_keys_and_dims():
    b = BundleSource(BUNDLE)
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    out_key, out = next(iter(meta["network_data_format"]["outputs"].items()))
    assert b.pred_key == out_key
    assert b.image_key == next(iter(meta["network_data_format"]["inputs"]))
    assert b.labels == {v.lower(): int(k) for k, v in out["channel_def"].items() if v.lower() != "background"}
    parser = b.parser("inference")
    assert parser["bundle_root"] == str(BUNDLE.resolve())
    assert b.spatial_dims(parser) == parser.get_parsed_content("network_def#spatial_dims")


def test_overrides_are_merged_in_order(tmp_path):
    a, c = tmp_path / "a.json", tmp_path / "c.json"
    a.write_text(json.dumps({"spatial_dims": 2, "roi_size": [64, 64]}))
    c.write_text(json.dumps({"roi_size": [32, 32]}))
    b = BundleSource(BUNDLE, f"{a},{c}")
    p = b.parser("inference")
    assert b.spatial_dims(p) == 2
    assert p.get_parsed_content("roi_size") == [32, 32]
    assert b.config_files("train")[1:] == [str(a), str(c)]


def test_missing_bundle_or_override_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--conf bundle"):
        BundleSource(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        BundleSource(BUNDLE, str(tmp_path / "missing.json"))


def test_checkpoints_load_weights_only(tmp_path):
    sd = OrderedDict(w=torch.arange(3.0), b=torch.zeros(2))
    plain, wrapped, ddp = tmp_path / "plain.pt", tmp_path / "wrapped.pt", tmp_path / "ddp.pt"
    torch.save(sd, plain)
    torch.save({"model": sd, "epoch": 3}, wrapped)
    torch.save({f"module.{k}": v for k, v in sd.items()}, ddp)
    for f in (plain, wrapped, ddp):
        got = load_state_dict(str(f))
        assert list(got) == ["w", "b"] and torch.equal(got["w"], sd["w"])
    assert file_digest(str(plain)) != file_digest(str(wrapped))
    state, digest = read_checkpoint(str(wrapped))
    assert digest == file_digest(str(wrapped)) and torch.equal(state["b"], sd["b"])


class _Payload:
    """Stands for any object whose unpickling would run code."""


def test_checkpoint_needing_code_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"model": _Payload()}, bad)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict(str(bad))
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(ValueError, match="no state dict"):
        load_state_dict(str(empty))


def test_server_binds_loopback_unless_asked(tmp_path, capsys):
    serve_main(["--studies", str(tmp_path), "--port", "8123", "--conf", "configs", "x.json", "--dry-run"])
    cmd = capsys.readouterr().out.split()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--app") + 1] == str(REPO / "ulite_monai" / "label")
    assert ["--conf", "configs", "x.json"] == cmd[cmd.index("--conf"):cmd.index("--conf") + 3]
    serve_main(["--studies", str(tmp_path), "--host", "0.0.0.0", "--dry-run"])
    cmd = capsys.readouterr().out.split()
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    with pytest.raises(SystemExit, match="no such folder"):
        serve_main(["--studies", str(tmp_path / "absent"), "--dry-run"])
