# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Smoke tests of the benchmark CLI (tiny sizes, few models): outputs are written with the right fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ulite_monai.bench import cli, measure, report
from ulite_monai.bench.models import build_model
from ulite_monai.bench.sliding import bundle_inferer_settings, sweep_settings

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "ulite"


def test_summarise_median_and_p90():
    s = measure.summarise([0.003, 0.001, 0.002, 0.010, 0.004])
    assert s["n"] == 5
    assert s["median_ms"] == pytest.approx(3.0)
    assert s["min_ms"] == pytest.approx(1.0)
    assert s["p90_ms"] == pytest.approx(10.0)
    assert measure.summarise([])["median_ms"] is None


def test_flops_counts_convolutions():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    # 2 * MACs: out pixels * out channels * (in channels * kernel taps)
    assert measure.flops_of(conv, torch.zeros(1, 3, 16, 16)) == 2 * 16 * 16 * 8 * 3 * 9


def test_onnx_runtime_matches_fused_network(tmp_path):
    fn, fused = build_model("ulite-onnx", 2, workdir=str(tmp_path))
    for shape in [(1, 3, 64, 64), (2, 3, 100, 72)]:  # dynamic batch and spatial axes (any size: padded inside)
        x = torch.randn(shape)
        with torch.inference_mode():
            ref = fused(x)
        out = fn(x)
        assert out.shape == ref.shape
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-3)


def test_child_process_cap_skips_with_reason():
    res = measure.run_child(["infer", "--model", "classic-unet", "--dims", "3", "--threads", "1"], timeout_s=1.0)
    assert res["status"] == "skipped"
    assert "--max-model-s" in res["reason"]


def test_bundle_inferer_settings_from_bundle_with_overrides(tmp_path):
    from ulite_monai.bundle import Bundle

    s, source = bundle_inferer_settings(Bundle(BUNDLE))  # the bundle's own inference.json
    assert s["roi_size"] == [128, 128, 128] and s["sw_batch_size"] == 2 and s["overlap"] == 0.25
    assert s["mode"] == "gaussian" and s["features"] == [8, 16, 32, 64, 128]
    assert str(BUNDLE) in source
    b = Bundle(BUNDLE, overrides=["roi_size=[48, 40, 32]", "sw_batch_size=3", "sw_overlap=0.4",
                                  "features=[4, 8, 16, 32, 64]", "inferer#mode=constant"])
    s, source = bundle_inferer_settings(b)
    assert s == {"roi_size": [48, 40, 32], "sw_batch_size": 3, "overlap": 0.4, "mode": "constant",
                 "features": [4, 8, 16, 32, 64]}
    assert "sw_batch_size=3" in source  # the report names the overrides
    unet = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
            "channels": [8, 16], "strides": [2]}
    assert bundle_inferer_settings(Bundle(BUNDLE, overrides={"network_def": unet}))[0]["features"] is None
    sweep = sweep_settings(dict(s, roi_size=[64] * 3), rois=[64, 96], batches=[4], overlaps=[0.5])
    assert sweep[0]["roi_size"] == [64] * 3
    assert len(sweep) == 4  # base, roi 96, batch 4, overlap 0.5 (roi 64 is the base already)
    assert {tuple(x["roi_size"]) for x in sweep} == {(64,) * 3, (96,) * 3}


def test_bundle_inferer_settings_without_bundle_or_for_2d_fail_clearly(tmp_path):
    from ulite_monai.bundle import Bundle

    with pytest.raises(FileNotFoundError, match="pass the bundle folder"):
        bundle_inferer_settings(tmp_path / "no_bundle")
    with pytest.raises(ValueError, match="3D volume"):
        bundle_inferer_settings(Bundle(BUNDLE, overrides={"spatial_dims": 2}))


def test_cpu_sliding_window_rounds_interleave_models_and_report_medians(monkeypatch):
    from ulite_monai.bench import sliding

    calls = []
    times = {"ulite-fused": [3.0, 1.0, 2.0, 9.0, 5.0, 7.0], "monai-unet": [4.0, 6.0, 5.0, 8.0]}

    def fake_child(args, timeout_s, max_rss_mb):
        model, roi = args[args.index("--model") + 1], args[args.index("--roi") + 1]
        calls.append((model, roi))
        if model == "monai-unet" and roi == 96 and len([c for c in calls if c == (model, roi)]) == 2:
            return {"status": "skipped", "reason": "passed the cap"}  # fails in round 2: not retried in round 3
        return {"status": "ok", "call_s": times[model].pop(0), "peak_rss_mb": 100.0 + len(calls),
                "base_rss_mb": 50.0, "params": 1}

    monkeypatch.setattr(sliding.measure, "run_child", fake_child)
    settings = [{"roi_size": [r] * 3, "sw_batch_size": 1, "overlap": 0.25, "mode": "gaussian"} for r in (64, 96)]
    out = sliding.run_sliding_window(["ulite-fused", "monai-unet"], volume=(8, 8, 8), settings=settings,
                                     log=lambda m: None, repeats=3)
    # each round: setting by setting, the models of a setting in turn
    assert calls[:4] == [("ulite-fused", 64), ("monai-unet", 64), ("ulite-fused", 96), ("monai-unet", 96)]
    assert calls.count(("monai-unet", 96)) == 2 and calls.count(("ulite-fused", 96)) == 3 and len(calls) == 11
    runs = {(r["model"], r["roi"][0]): r for r in out["runs"]}
    assert [(r["model"], r["roi"][0]) for r in out["runs"]] == [
        ("ulite-fused", 64), ("ulite-fused", 96), ("monai-unet", 64), ("monai-unet", 96)]
    assert runs[("ulite-fused", 64)]["wall_s_runs"] == [3.0, 2.0, 5.0] and runs[("ulite-fused", 64)]["wall_s"] == 3.0
    assert runs[("ulite-fused", 96)]["wall_s"] == 7.0  # median of 1, 9, 7
    assert runs[("ulite-fused", 64)]["peak_rss_mb"] == 100.0 + 9  # the highest of its passes (the 9th call)
    failed = runs[("monai-unet", 96)]
    assert failed["status"] == "skipped" and "wall_s" not in failed and "round 2" in failed["note"]
    assert out["best"]["MONAI UNet"]["wall_s"] == 5.0 and out["best"]["U-Lite fused"]["wall_s"] == 3.0
    md = "\n".join(report._sw_table(out))
    assert "3 rounds over the settings" in md and "| 3.0 |" in md


def test_unknown_model_is_an_error(capsys):
    assert cli.main(["--models", "no-such-net", "--out", "unused"]) == 2
    assert "no-such-net" in capsys.readouterr().err


def test_quick_speed_and_sliding_window_outputs(tmp_path):
    out = tmp_path / "bench"
    rc = cli.main(["--quick", "--modes", "speed", "sw", "--dims", "2", "--models", "ulite", "ulite-default",
                   "ulite-fused", "monai-unet", "--threads", "1", "--sw-models", "ulite-fused",
                   "--sw-volume", "48", "48", "32", "--sw-batch", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "benchmark.json").read_text())
    env = data["environment"]
    assert env["torch_threads"] == 1 and env["cpu_count"] >= 1
    assert len(data["load_average_start"]) == 3
    res = {r["model"]: r for r in data["speed"]["results"]}
    assert set(res) == {"ulite", "ulite-default", "ulite-fused", "monai-unet"}
    for r in res.values():
        assert r["status"] == "ok", r["notes"]
        assert r["params"] > 800_000 and r["flops"] > 0
        assert r["latency_bs1"]["n"] == 3 and r["latency_bs1"]["p90_ms"] >= r["latency_bs1"]["median_ms"] > 0
        assert r["burst"] == 2 and r["latency_bs1_cold"]["n"] == 3  # quick: 3 rounds of 2 calls, first is cold
        assert r["throughput_per_s"] > 0 and r["infer_peak_rss_mb"] > 50
    assert res["ulite"]["train_step"]["median_ms"] > 0 and res["ulite"]["train_peak_rss_mb"] > 50
    assert "train_step" not in res["ulite-fused"]  # eval-only variant
    assert res["ulite-default"]["params"] == res["ulite"]["params"]  # the same network, another implementation
    train = {(q["model"], q["versus"]): q["speedup"] for q in data["speed"]["train_ratios"]}
    assert set(train) == {("ulite-default", "monai-unet"), ("ulite-default", "ulite")}
    assert train[("ulite-default", "ulite")] == pytest.approx(
        res["ulite"]["train_step"]["median_ms"] / res["ulite-default"]["train_step"]["median_ms"])
    ratio = [q for q in data["speed"]["ratios"] if q["model"] == "ulite-fused" and q["versus"] == "ulite"]
    assert len(ratio) == 1
    assert ratio[0]["speedup"] == pytest.approx(
        res["ulite"]["latency_bs1"]["median_ms"] / res["ulite-fused"]["latency_bs1"]["median_ms"])
    cold = [q for q in data["speed"]["ratios_cold"] if q["model"] == "ulite-fused" and q["versus"] == "ulite"]
    assert cold[0]["speedup"] == pytest.approx(
        res["ulite"]["latency_bs1_cold"]["median_ms"] / res["ulite-fused"]["latency_bs1_cold"]["median_ms"])
    sw = data["sliding_window"]
    assert sw["volume"] == [48, 48, 32]
    assert [r["status"] for r in sw["runs"]] == ["ok"]
    assert sw["runs"][0]["wall_s"] > 0 and sw["runs"][0]["peak_rss_mb"] > 50
    assert "U-Lite fused" in sw["best"]
    md = (out / "benchmark.md").read_text()
    assert "| U-Lite (unfused) |" in md and "| U-Lite (default) |" in md and "| U-Lite fused |" in md
    assert "Sliding-window" in md and "training step: default U-Lite speed-up over MONAI UNet" in md
    assert "fused U-Lite speed-up over the unfused reference structure" in md
    assert "| bs1 cold median (ms) |" in md and "| cold calls |" in md
    png = (out / "latency_vs_params.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_markdown_lists_skipped_models_with_reason(tmp_path):
    speed = {"threads": 1, "ratios": [], "results": [
        {"model": "swinunetr", "label": "MONAI SwinUNETR", "family": "monai", "dims": 3, "status": "skipped",
         "input_shape": [1, 1, 128, 128, 128], "notes": ["inference: ran past the 300 s cap per model"]}]}
    md = report.markdown({"environment": report.environment(), "created_utc": "now", "command": "x", "speed": speed})
    assert "| MONAI SwinUNETR |" in md and "ran past the 300 s cap" in md
    report.plot(speed, tmp_path / "p.png")  # a panel with nothing timed still renders
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.slow
def test_quick_quality_mode(tmp_path):
    from ulite_monai.bench.quality import run_quality

    q = run_quality(budget_s=1.0, data_dir=str(tmp_path / "data"), quick=True, bundle=BUNDLE, log=lambda m: None)
    assert [r["model"] for r in q["runs"]] == ["ulite", "monai-unet"]
    for r in q["runs"]:
        assert r["status"] == "ok", r.get("note")  # both evaluated through the bundle's inference pipeline
        assert r["steps"] >= 1 and r["cpu_s"] >= 1.0
        assert len(r["dice_per_case"]) == q["num_val"] == 1 and q["num_train"] == 2
        assert 0.0 <= r["dice_mean"] <= 1.0
    assert q["runs"][0]["params"] == 64_178  # the bundle's network_def (features 8..128), not a built-in one
    assert q["runs"][1]["params"] > 4_000_000  # MONAI UNet 16..256 in 3D
    assert q["patch_size"] == [48, 48, 48] and q["roi_size"] == [128, 128, 128]  # the bundle's settings
    assert "inference.json" in q["data"] and str(BUNDLE) in q["data"]


def test_update_keeps_other_modes(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    earlier_quality = {"budget_cpu_s": 1.0, "data": "d", "runs": []}
    (out / "benchmark.json").write_text(json.dumps({
        "created_utc": "then", "command": "python -m ulite_monai.bench --modes quality",
        "quality": earlier_quality, "sliding_window": {"volume": [1, 1, 1], "runs": [], "best": {}}}))
    rc = cli.main(["--quick", "--modes", "sw", "--update", "--sw-models", "monai-unet", "--sw-volume", "40", "40", "32",
                   "--sw-batch", "--threads", "1", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "benchmark.json").read_text())
    assert data["quality"] == earlier_quality  # kept
    assert data["sliding_window"]["volume"] == [40, 40, 32]  # replaced by this run
    assert data["earlier_runs"][0]["kept"] == ["quality"]
    assert "are from another run" in (out / "benchmark.md").read_text()


def test_update_attributes_each_kept_section_to_the_run_that_measured_it():
    """Three --update runs in a row: each section is credited to the run that measured it, a run whose sections
    were all replaced drops out, and the machine of each run is named."""
    first = {"created_utc": "t1", "command": "bench --modes speed sw", "environment": {"cpu": "AMD EPYC"},
             "speed": {"a": 1}, "sliding_window": {"b": 2}}
    second = {"created_utc": "t2", "command": "bench --modes train --update", "environment": {"cpu": "Intel Xeon"},
              "training_step": {"c": 3}} | cli.earlier_results(first, ["training_step"])
    assert second["speed"] == {"a": 1} and second["sliding_window"] == {"b": 2}
    assert [(r["created_utc"], r["kept"], r["machine"]) for r in second["earlier_runs"]] == [
        ("t1", ["speed", "sliding_window"], "AMD EPYC")]
    third = cli.earlier_results(second, ["speed", "sliding_window"])  # a speed + sw rerun
    assert set(third) == {"training_step", "earlier_runs"}
    assert [(r["created_utc"], r["kept"], r["machine"]) for r in third["earlier_runs"]] == [
        ("t2", ["training_step"], "Intel Xeon")]  # the first run provides nothing any more
    gpu = {"created_utc": "t3", "command": "bench --device cuda", "environment": {"cpu": "x", "cuda_device": {
        "gpu": "NVIDIA H200"}}, "speed": {}}
    assert cli.earlier_results(gpu, [])["earlier_runs"][0]["machine"] == "NVIDIA H200"
    assert cli.earlier_results(gpu, ["speed"]) == {}


def test_committed_cpu_report_renders_unchanged():
    """The committed CPU tables are what the report code makes of the committed JSON (the GPU additions leave
    CPU reports as they were)."""
    docs = BUNDLE.parents[1] / "docs" / "benchmarks"
    data = json.loads((docs / "benchmark.json").read_text())
    assert report.markdown(data) == (docs / "benchmark.md").read_text()
