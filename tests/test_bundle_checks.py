# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""MONAI's own bundle checks, run offline: metadata schema, network in/out, TorchScript and ONNX export,
workflow properties."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, onnx_export, verify_metadata, verify_net_in_out

from support.bundle import BUNDLE, CONFIGS
from ulite_monai.data.demo import generate_demo_dataset

META = str(CONFIGS / "metadata.json")
INFER = str(CONFIGS / "inference.json")
TRAIN = str(CONFIGS / "train.json")
SCHEMA = str(BUNDLE / "schema" / "metadata.schema.json")


def test_bundle_layout():
    for rel in ["LICENSE", "configs/metadata.json", "configs/train.json", "configs/evaluate.json",
                "configs/inference.json", "configs/multi_gpu_train.json", "configs/logging.conf",
                "docs/README.md", "docs/data_license.txt"]:
        assert (BUNDLE / rel).is_file(), rel


def test_verify_metadata_offline():
    verify_metadata(meta_file=META, filepath=SCHEMA)  # the schema file exists: no download


def test_metadata_schema_rejects_missing_keys(tmp_path):
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    del meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="channel_def"):
        verify_metadata(meta_file=str(bad), filepath=SCHEMA)


def test_metadata_matches_configs():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    parser = ConfigParser()
    parser.read_config(INFER)
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == parser["in_channels"]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == parser["out_channels"]
    assert "not" in meta["intended_use"].lower() and "diagnos" in meta["intended_use"].lower()
    assert any("2306.16103" in r for r in meta["references"])


def test_inference_and_validation_preprocessing_agree():
    """The inference chain must equal the training/validation one (same geometry and intensity steps)."""
    tr, inf = ConfigParser(), ConfigParser()
    tr.read_config(TRAIN)
    inf.read_config(INFER)
    for key in ("pixdim", "intensity_range", "roi_size", "features", "spatial_dims", "in_channels", "out_channels"):
        assert tr[key] == inf[key], key
    targets_tr = [t["_target_"] for t in tr["train"]["deterministic_transforms"] if "CheckLabels" not in t["_target_"]]
    targets_inf = [t["_target_"] for t in inf["preprocessing"]["transforms"]]
    assert targets_tr == targets_inf
    assert inf["network_def"] == tr["network_def"]


def test_verify_net_in_out():
    verify_net_in_out(net_id="network_def", meta_file=META, config_file=INFER, device="cpu", n=2)


def _random_checkpoint(tmp_path):
    parser = ConfigParser()
    parser.read_config(INFER)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").eval()
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    return net, ckpt


def test_ckpt_export_torchscript_matches(tmp_path):
    net, ckpt = _random_checkpoint(tmp_path)
    ts_path = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts_path), ckpt_file=str(ckpt), meta_file=META, config_file=INFER)
    ts = torch.jit.load(str(ts_path))
    x = torch.rand(1, 1, 40, 32, 24)  # not a multiple of 16: exercises the internal pad/crop
    with torch.no_grad():
        torch.testing.assert_close(ts(x), net(x), atol=1e-5, rtol=1e-4)


def test_onnx_export_matches(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    net, ckpt = _random_checkpoint(tmp_path)
    onnx_path = tmp_path / "model.onnx"
    onnx_export(net_id="network_def", filepath=str(onnx_path), ckpt_file=str(ckpt), meta_file=META,
                config_file=INFER, input_shape=[1, 1, 32, 32, 32], use_trace=True)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 1, 32, 32, 32)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, net(x).numpy(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("workflow_type,config", [("train", TRAIN), ("infer", INFER)])
def test_config_workflow_properties(workflow_type, config, tmp_path):
    # a one-case dataset in tmp_path: the check must not touch the repository's dataset folder
    generate_demo_dataset(tmp_path / "data", num_train=1, num_val=1, num_test=1)
    overrides = {"dataset_dir": str(tmp_path / "data"), "ckpt_dir": str(tmp_path), "log_dir": str(tmp_path),
                 "output_dir": str(tmp_path), "ckpt_path": None}
    wf = ConfigWorkflow(config_file=config, meta_file=META, workflow_type=workflow_type,
                        logging_file=str(CONFIGS / "logging.conf"), **overrides)
    wf.initialize()
    assert wf.check_properties() == []
    for key in ("network_def", "bundle_root", "dataset_dir", "device"):
        assert key in wf.parser
    if workflow_type == "infer":
        for key in ("preprocessing", "inferer", "postprocessing", "use_fused"):
            assert key in wf.parser
