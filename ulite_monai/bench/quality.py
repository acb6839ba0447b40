# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Quality at equal budget: U-Lite and MONAI UNet trained for the same CPU time, validation Dice for each.

The pipeline is the bundle's (``bundles/ulite/configs/train.json`` read with ``monai.bundle.ConfigParser``):
its train/validation preprocessing, datalists (the embedded demo data, generated on first use), loss,
batch size, learning rate and sliding-window settings. Only ``network_def`` changes between the models. The
budget is process CPU time (``time.process_time``, all threads), which is fairer than wall time on a
shared machine; data caching happens before the clock starts, random augmentation is counted.
When the bundle config cannot be read, a built-in MONAI pipeline on the same demo data is used and the
report says so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = ["run_quality", "DEFAULT_BUNDLE_TRAIN"]

DEFAULT_BUNDLE_TRAIN = Path("bundles") / "ulite" / "configs" / "train.json"


def _bundle_pipeline(config: Path, data_dir: str, num_train: int | None, num_val: int | None) -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config))
    parser["dataset_dir"] = str(Path(data_dir).resolve())
    if num_train is not None:
        parser["num_train_cases"] = num_train
    if num_val is not None:
        parser["num_val_cases"] = num_val
    p = parser.get_parsed_content
    train_list, val_list = p("train_datalist"), p("val_datalist")
    if num_train is not None:
        train_list = train_list[:num_train]
    if num_val is not None:
        val_list = val_list[:num_val]
    return {
        "source": f"bundle pipeline from {config}",
        "train_list": train_list,
        "val_list": val_list,
        "train_transform": p("train#preprocessing"),
        "val_transform": p("validate#preprocessing"),
        "loss": p("loss"),
        "batch_size": int(p("batch_size")),
        "lr": float(p("learning_rate")),
        "roi_size": list(p("roi_size")),
        "sw_batch_size": int(p("sw_batch_size")),
        "overlap": float(p("sw_overlap")),
        "ulite": p("network_def"),
    }


def _builtin_pipeline(data_dir: str, num_train: int | None, num_val: int | None, patch: int) -> dict:
    """MONAI transforms on the demo data, for when the bundle config is unavailable."""
    import json

    from monai import transforms as T
    from monai.losses import DiceCELoss

    from ulite_monai.data.demo import ensure_demo_dataset
    from ulite_monai.networks import ULite

    kwargs = {}
    if num_train is not None:
        kwargs.update(num_train=num_train, num_val=num_val or 1, num_test=0)
    datalist = ensure_demo_dataset(data_dir, **kwargs)
    root = Path(datalist).parent
    dl = json.loads(Path(datalist).read_text())
    fix = lambda items: [{k: str(root / v) for k, v in it.items()} for it in items]  # noqa: E731
    keys = ["image", "label"]
    det = [T.LoadImaged(keys, image_only=True), T.EnsureChannelFirstd(keys), T.Orientationd(keys, axcodes="RAS"),
           T.Spacingd(keys, pixdim=(2.5, 2.5, 2.5), mode=("bilinear", "nearest")),
           T.ScaleIntensityRanged("image", a_min=-200, a_max=300, b_min=0.0, b_max=1.0, clip=True)]
    rnd = [T.SpatialPadd(keys, spatial_size=(patch,) * 3),
           T.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=(patch,) * 3, pos=2, neg=1, num_samples=4)]
    return {
        "source": "built-in MONAI pipeline (bundle config unavailable) on ulite_monai.data.demo",
        "train_list": fix(dl["training"])[: num_train or None],
        "val_list": fix(dl["validation"])[: num_val or None],
        "train_transform": T.Compose(det + rnd),
        "val_transform": T.Compose(det),
        "loss": DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True),
        "batch_size": 2,
        "lr": 3e-3,
        "roi_size": [64, 64, 64],
        "sw_batch_size": 2,
        "overlap": 0.25,
        "ulite": ULite(3, 1, 2, features=(16, 32, 64, 128, 256)),
    }


def _dice(net: torch.nn.Module, val_ds, inferer) -> list[float]:
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    from ulite_monai.networks import inference_network

    fn = inference_network(net)
    metric = DiceMetric(include_background=False, reduction="none")
    out = []
    with torch.inference_mode():
        for item in val_ds:
            img = item["image"].unsqueeze(0).as_tensor() if hasattr(item["image"], "as_tensor") else item["image"][None]
            lab = torch.as_tensor(item["label"])[None]
            pred = inferer(img, fn).argmax(1, keepdim=True)
            n = max(2, int(lab.max().item()) + 1)
            d = metric(one_hot(pred, n), one_hot(lab.long(), n))
            out.append(float(torch.nan_to_num(d, nan=0.0).mean()))
    return out


def run_quality(
    models: Sequence[str] = ("ulite", "monai-unet"),
    budget_cpu_s: float = 300.0,
    data_dir: str = ".ulite_cache/bench_demo",
    patch: int = 64,
    lr: float | None = None,
    quick: bool = False,
    bundle_config: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train each model for ``budget_cpu_s`` CPU-seconds with the same data and settings, then report Dice.

    Args:
        models: ``"ulite"`` (the bundle's network) and/or ``"monai-unet"`` (channels 16..256, 2 res units).
        budget_cpu_s: process CPU seconds of training per model.
        data_dir: demo dataset folder (generated on first use).
        patch: training patch edge for the built-in fallback pipeline.
        lr: learning rate (default: the bundle's).
        quick: a few cases only (smoke test).
        bundle_config: the bundle's train.json (default ``bundles/ulite/configs/train.json``).
    """
    import copy

    from monai.data import CacheDataset, DataLoader
    from monai.inferers import SlidingWindowInferer
    from monai.utils import set_determinism

    from ulite_monai.bench.models import build_model
    from ulite_monai.bench.measure import param_count
    from ulite_monai.bench.sliding import _default_config

    n_train, n_val = (2, 1) if quick else (None, None)
    config = Path(bundle_config) if bundle_config else _default_config("train.json")
    fallback_reason = None
    pipe = None
    if config.is_file():
        try:
            pipe = _bundle_pipeline(config, data_dir, n_train, n_val)
        except Exception as e:  # noqa: BLE001 - the bundle is optional here; say why it was not used
            fallback_reason = f"{type(e).__name__}: {str(e)[:200]}"
    else:
        fallback_reason = f"{config} not found"
    if pipe is None:
        pipe = _builtin_pipeline(data_dir, n_train, n_val, patch)
        log(f"[quality] bundle pipeline unavailable ({fallback_reason}); using the built-in one")
    lr = float(lr if lr is not None else pipe["lr"])
    log(f"[quality] caching {len(pipe['train_list'])} training and {len(pipe['val_list'])} validation cases ...")
    train_ds = CacheDataset(pipe["train_list"], transform=pipe["train_transform"], cache_rate=1.0, num_workers=0,
                            progress=False)
    val_ds = CacheDataset(pipe["val_list"], transform=pipe["val_transform"], cache_rate=1.0, num_workers=0,
                          progress=False)
    inferer = SlidingWindowInferer(roi_size=pipe["roi_size"], sw_batch_size=pipe["sw_batch_size"],
                                   overlap=pipe["overlap"], mode="gaussian")
    runs = []
    for name in models:
        set_determinism(seed=0)
        net = copy.deepcopy(pipe["ulite"]) if name == "ulite" else build_model(name, 3, train=True)[1]
        net.train()
        loss_fn = pipe["loss"]
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        loader = DataLoader(train_ds, batch_size=pipe["batch_size"], shuffle=True, num_workers=0)
        log(f"[quality] training {name} for {budget_cpu_s:.0f} CPU-seconds ...")
        steps, last_loss = 0, float("nan")
        cpu0, wall0 = time.process_time(), time.perf_counter()
        done = False
        while not done:
            for batch in loader:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(batch["image"]), batch["label"])
                loss.backward()
                opt.step()
                steps += 1
                last_loss = float(loss.detach())
                if time.process_time() - cpu0 >= budget_cpu_s:
                    done = True
                    break
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        net.eval()
        dice = _dice(net, val_ds, inferer)
        label = "U-Lite (bundle network)" if name == "ulite" else "MONAI UNet"
        runs.append({"model": name, "label": label, "params": param_count(net), "steps": steps, "cpu_s": cpu_s,
                     "wall_s": wall_s, "last_loss": last_loss, "dice_per_case": dice,
                     "dice_mean": sum(dice) / max(1, len(dice))})
        log(f"[quality]   {steps} steps, {cpu_s:.0f} CPU-s, {wall_s:.0f} s wall, Dice {runs[-1]['dice_mean']:.3f}")
    set_determinism(seed=None)
    return {"budget_cpu_s": budget_cpu_s, "data": pipe["source"] + (f" ({fallback_reason})" if fallback_reason else ""),
            "num_train": len(pipe["train_list"]), "num_val": len(pipe["val_list"]), "lr": lr,
            "batch_size": pipe["batch_size"], "roi_size": pipe["roi_size"], "runs": runs}
