# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The one bundle layer: locating, configs with overrides, metadata, the checkpoint reader, the pipeline."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from support.bundle import BUNDLE, REPO

from ulite_monai.bundle import (
    Bundle,
    CheckpointError,
    file_digest,
    load_weights,
    locate_bundle,
    parse_overrides,
    read_checkpoint,
)
from ulite_monai.networks import FusedULite, ULite


def small_bundle(tmp_path: Path, **settings) -> Path:
    """A copy of the bundle's configs with a small network (fast to build); no weights."""
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    for f in (BUNDLE / "configs").iterdir():
        (root / "configs" / f.name).write_bytes(f.read_bytes())
    return root


# ------------------------------------------------------------------------------------------- locating, configs


def test_locate_from_repo_root_bundle_folder_or_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("ULITE_BUNDLE", raising=False)
    assert locate_bundle() == BUNDLE.resolve()
    assert locate_bundle(BUNDLE / "configs" / "inference.json") == BUNDLE.resolve()
    monkeypatch.setenv("ULITE_BUNDLE", str(small_bundle(tmp_path)))
    assert locate_bundle() == (tmp_path / "bundle").resolve()
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        locate_bundle(tmp_path / "nowhere")


def test_parse_overrides_json_or_string():
    got = parse_overrides(["a=2", "b#c=[64, 64]", "d=true", "e=$@bundle_root + '/x'", "f=cuda:0", "g=null"])
    assert got == {"a": 2, "b#c": [64, 64], "d": True, "e": "$@bundle_root + '/x'", "f": "cuda:0", "g": None}
    assert parse_overrides({"x": 1}) == {"x": 1}
    with pytest.raises(ValueError, match="ID=VALUE"):
        parse_overrides(["no_equals_sign"])


def test_files_then_settings_are_merged_in_order(tmp_path):
    a, c = tmp_path / "a.json", tmp_path / "c.json"
    a.write_text(json.dumps({"spatial_dims": 2, "roi_size": [64, 64], "pixdim": [1.0, 1.0]}))
    c.write_text(json.dumps({"roi_size": [32, 32]}))
    b = Bundle(BUNDLE, f"{a},{c}", ["sw_batch_size=3"])
    p = b.parser("inference")
    assert p["bundle_root"] == str(BUNDLE.resolve())
    assert p.get_parsed_content("roi_size") == [32, 32]
    assert p.get_parsed_content("inferer#sw_batch_size") == 3
    assert b.info(p).spatial_dims == 2  # the config wins over metadata.json's 3D shape
    assert b.config_files("train")[1:] == [str(a), str(c)]
    assert b.parser("inference", roi_size=[16, 16]).get_parsed_content("inferer#roi_size") == [16, 16]


def test_missing_override_or_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Bundle(BUNDLE, [tmp_path / "missing.json"])
    with pytest.raises(FileNotFoundError, match="configs/nothere.json"):
        Bundle(BUNDLE).config_files("nothere")


def test_info_reads_labels_keys_and_dims_from_metadata():
    b = Bundle(BUNDLE)
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    out_key, out = next(iter(meta["network_data_format"]["outputs"].items()))
    info = b.info()
    assert info.pred_key == out_key and info.image_key == next(iter(meta["network_data_format"]["inputs"]))
    assert info.labels == {v.lower(): int(k) for k, v in out["channel_def"].items() if v.lower() != "background"}
    assert (info.spatial_dims, info.in_channels, info.out_channels) == (3, 1, 2)
    assert [s.number for s in info.segments()] == [1]


def test_workflow_is_the_bundle_run_with_settings():
    wf = Bundle(BUNDLE, overrides={"max_epochs": 1}).workflow("train", "train", val_interval=1)
    assert wf.parser["max_epochs"] == 1 and wf.parser["val_interval"] == 1
    assert wf.parser["bundle_root"] == str(BUNDLE.resolve())


def test_no_config_parser_or_checkpoint_reading_outside_the_bundle_layer():
    """Issue "one bundle layer": every door reads configs and weights through ulite_monai.bundle."""
    offenders = []
    for f in (REPO / "ulite_monai").rglob("*.py"):
        if "bundle" in f.relative_to(REPO / "ulite_monai").parts[:1]:
            continue
        text = f.read_text(encoding="utf-8")
        if re.search(r"ConfigParser\(|ConfigWorkflow\(|torch\.load\(", text):
            offenders.append(str(f.relative_to(REPO)))
    assert offenders == [], offenders


# ------------------------------------------------------------------------------------------- checkpoints


def _state():
    return OrderedDict(w=torch.arange(3.0), b=torch.zeros(2))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "epoch": 3},  # the bundle's CheckpointSaver with several objects
        lambda sd: {"network": sd},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},  # DataParallel / DDP saved with torch.save
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 2},  # Lightning
        lambda sd: {"state_dict": {**{f"model.{k}": v for k, v in sd.items()}, "loss.pos_weight": torch.ones(1)}},
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},  # torch.compile'd module
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    ],
)
def test_one_reader_for_every_layout(tmp_path, wrap):
    f = tmp_path / "ckpt.pt"
    torch.save(wrap(_state()), f)
    state, digest = read_checkpoint(f, expected_keys=["w", "b"])
    assert list(state) == ["w", "b"] and torch.equal(state["w"], _state()["w"])
    assert digest == file_digest(f)


def test_holder_prefix_is_kept_when_the_network_names_itself_so(tmp_path):
    """MONAI's UNet names its parameters ``model.*``: its checkpoints must not lose that prefix."""
    from monai.networks.nets import UNet

    unet = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    for saved in (unet.state_dict(), {"model": unet.state_dict()}, {f"module.{k}": v for k, v in unet.state_dict().items()}):
        f = tmp_path / "unet.pt"
        torch.save(saved, f)
        fresh = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
        load_weights(fresh, f)
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), unet.state_dict().values()))
    torch.save({"module.w": torch.zeros(1), "module.model.b": torch.ones(1)}, f)
    assert list(read_checkpoint(f)[0]) == ["w", "model.b"]  # without a target: wrappers only


class _Payload:
    """Stands for any object whose unpickling would run code."""


def test_weights_only_refuses_code_and_names_the_file(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"model": _Payload()}, bad)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*weights_only=True"):
        read_checkpoint(bad)
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(CheckpointError, match="no state dict"):
        read_checkpoint(empty)
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 not a whole file")
    with pytest.raises(CheckpointError, match="torn.pt"):
        read_checkpoint(tmp_path / "torn.pt")
    with pytest.raises(FileNotFoundError, match="Train first"):
        read_checkpoint(tmp_path / "absent.pt")


def test_mismatching_checkpoint_says_which_entries(tmp_path):
    net = ULite(3, 1, 2, features=(4, 8, 16))
    other = ULite(3, 1, 2, features=(4, 8, 32))
    f = tmp_path / "other.pt"
    torch.save(other.state_dict(), f)
    with pytest.raises(CheckpointError, match="does not fit the bundle's network_def .*mismatching"):
        load_weights(net, f)


def test_reference_code_checkpoint_loads_into_ulite(tmp_path):
    from test_networks import reference_state_dict  # the reference code's names and shapes

    ref_sd = reference_state_dict(seed=5)
    f = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in ref_sd.items()}, "epoch": 7}, f)
    net = ULite(2, 3, 1).eval()
    assert load_weights(net, f).startswith("sha256:")
    assert torch.equal(net.state_dict()["encoders.0.dw.convs.1.weight"], ref_sd["e1.dw.dw_w.weight"])
    assert torch.equal(net.state_dict()["decoders.4.norm.running_var"], ref_sd["d1.bn.running_var"])


# ------------------------------------------------------------------------------------------- pipeline


def test_pipeline_honours_use_fused_amp_device_and_checkpoint(tmp_path):
    root = small_bundle(tmp_path)
    small = {"features": [4, 8, 16], "roi_size": [32, 32, 32]}
    p = Bundle(root, overrides=small).pipeline(random_weights=True, device="cpu")
    assert isinstance(p.network, FusedULite) and p.fused and p.weights_id == "random-init"
    assert not p.autocast_enabled and p.device == torch.device("cpu")
    p2 = Bundle(root, overrides={**small, "use_fused": False}).pipeline(random_weights=True, device="cpu")
    assert isinstance(p2.network, ULite) and not p2.network.training
    x = torch.randn(1, 1, 32, 32, 32)
    assert torch.allclose(p.predict(x), p2.predict(x), atol=1e-4)  # same seeded init, folded or not
    p3 = Bundle(root, overrides=small).pipeline(random_weights=True, device="cpu", fuse=False, amp=True)
    assert not p3.fused and p3.amp and not p3.autocast_enabled  # autocast on CUDA only
    ckpt = tmp_path / "w.pt"
    torch.save({"model": p2.network.state_dict()}, ckpt)
    p4 = Bundle(root, overrides=small).pipeline(checkpoint=ckpt, device="cpu", fuse=False)
    assert p4.weights_id == "sha256:" + file_digest(ckpt) and p4.model_version.endswith(p4.weights_id)
    with pytest.raises(FileNotFoundError, match="train the bundle"):
        Bundle(root, overrides=small).pipeline(device="cpu")  # the config's models/model.pt does not exist
    with pytest.raises(ValueError, match="not both"):
        Bundle(root).pipeline(checkpoint=ckpt, random_weights=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Bundle(root, overrides=small).pipeline(random_weights=True, device="cuda")
