# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Quality at equal budget: U-Lite and MONAI UNet trained for the same time, validation Dice for each.

Everything comes from the bundle, read through :class:`~ulite_monai.bundle.Bundle`: ``train.json`` gives the
datalists (the embedded demo data, generated on first use under ``data_dir``), the cached training dataset and
its loader, the network, the loss and the optimiser (``learning_rate``); only ``network_def`` changes between
the models (U-Lite: the bundle's own; MONAI UNet: :data:`NETWORK_DEFS`). After training, each model's weights are
saved to a temporary checkpoint and every validation image goes through the bundle's *inference* pipeline
(``inference.json``: preprocessing, sliding-window inferer, postprocessing back onto the input grid, U-Lite
fused) with that checkpoint and the same ``network_def`` (:func:`segment`). Dice is computed between that label
map and the label file, read by the bundle's own image loader on the same grid.

The budget is process CPU time on the CPU (``time.process_time``, all threads: fairer than wall time on a shared
machine) and wall time on CUDA (each step ends with a synchronising loss read). Data caching happens before the
clock starts; random augmentation is counted. The bundle's learning-rate schedule (per epoch) is not used: the
number of epochs depends on the budget.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

__all__ = ["NETWORK_DEFS", "segment", "run_quality"]

#: ``network_def`` per quality model (``None``: the bundle's own); ``@`` ids are the bundle's
NETWORK_DEFS: dict[str, dict | None] = {
    "ulite": None,
    "monai-unet": {
        "_target_": "monai.networks.nets.UNet",
        "spatial_dims": "@spatial_dims",
        "in_channels": "@in_channels",
        "out_channels": "@out_channels",
        "channels": [16, 32, 64, 128, 256],
        "strides": [2, 2, 2, 2],
        "num_res_units": 2,
    },
}

_LABELS = {"ulite": "U-Lite (bundle network)", "monai-unet": "MONAI UNet"}


def _bundle(bundle: Any, overrides: Mapping[str, Any] | Sequence[str] | None = None):
    """``bundle`` as a :class:`Bundle` (a folder or ``None`` is located), with ``overrides`` layered on its own."""
    from ulite_monai.bundle import Bundle, parse_overrides

    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    if not overrides:
        return b
    return Bundle(b.root, files=b.files, overrides={**b.overrides, **parse_overrides(overrides)})


def _image_loader(pipe) -> Callable:
    """The bundle's own image loader (the ``LoadImage`` inside the preprocessing's first ``LoadImaged``), so a
    label file is read exactly as the image it belongs to."""
    from monai.transforms import LoadImage, LoadImaged

    for t in getattr(pipe.preprocessing, "transforms", ()):
        if isinstance(t, LoadImaged):
            return t._loader
    return LoadImage(image_only=True)


def _label_map(pipe, image_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """The pipeline's label map for one image (integer array on the input's grid, channel dropped) and the
    affine it carries."""
    out = pipe(str(image_path))
    pred = out[pipe.info.pred_key]
    affine = np.asarray(pred.affine) if hasattr(pred, "affine") else None
    arr = np.asarray(pred.detach().cpu() if isinstance(pred, torch.Tensor) else pred)
    if arr.ndim == pipe.info.spatial_dims + 1 and arr.shape[0] == 1:
        arr = arr[0]
    dtype = np.uint8 if pipe.info.out_channels <= 256 else np.int32
    return np.rint(arr).astype(dtype), affine


def segment(bundle: Any, checkpoint: str | os.PathLike, image_path: str | os.PathLike, device: str = "cpu",
            overrides: Mapping[str, Any] | Sequence[str] | None = None) -> np.ndarray:
    """The label map the bundle's inference pipeline gives for one image, on the image's own grid.

    The same steps as ``python -m monai.bundle run --config_file configs/inference.json`` (through
    :class:`~ulite_monai.bundle.InferencePipeline`): the bundle's preprocessing, inferer (autocast per the
    config's ``amp`` on CUDA), postprocessing back onto the input grid. The written output goes to a temporary
    folder that is removed.

    Args:
        bundle: a :class:`~ulite_monai.bundle.Bundle`, a bundle folder, or ``None`` (located).
        checkpoint: the weights (any layout :func:`ulite_monai.bundle.read_checkpoint` reads).
        image_path: the input image (a file or a DICOM series folder).
        device: ``"cpu"``, ``"cuda"``, ``"auto"``.
        overrides: config settings layered on the bundle's (e.g. ``{"network_def": {...}}`` for the network the
            checkpoint belongs to).

    Returns:
        integer label map (``uint8`` for up to 256 classes), shaped as the input image's spatial grid.
    """
    b = _bundle(bundle, overrides)
    with tempfile.TemporaryDirectory(prefix="ulite_segment_") as tmp:
        pipe = b.pipeline(device=device, checkpoint=checkpoint, output_dir=tmp)
        return _label_map(pipe, image_path)[0]


def _dice(pred: np.ndarray, label: np.ndarray, out_channels: int) -> float:
    """Mean Dice over the foreground classes ``1..out_channels-1`` (a class absent from both counts as 1)."""
    scores = []
    for c in range(1, max(2, out_channels)):
        p, t = pred == c, label == c
        denom = int(p.sum()) + int(t.sum())
        scores.append(1.0 if denom == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denom)
    return float(np.mean(scores))


def _evaluate(b, checkpoint: Path, val_list: list[dict], device: torch.device, amp: str, workdir: Path) -> list[float]:
    pipe = b.pipeline(device=str(device), checkpoint=checkpoint, output_dir=workdir / "pred", amp=amp != "none")
    load = _image_loader(pipe)
    out = []
    for item in val_list:
        pred, affine = _label_map(pipe, item["image"])
        label = load(item["label"])
        lab = np.rint(np.asarray(label)).astype(np.int64)
        if lab.ndim == pred.ndim + 1 and lab.shape[0] == 1:
            lab = lab[0]
        if lab.shape != pred.shape or (affine is not None and hasattr(label, "affine")
                                       and not np.allclose(np.asarray(label.affine), affine, atol=1e-3)):
            raise ValueError(f"label {item['label']} is not on the grid of its image {item['image']} (shape "
                             f"{lab.shape} vs {pred.shape}); the datalist must pair each image with its own label.")
        out.append(_dice(pred, lab, pipe.info.out_channels))
    return out


def run_quality(
    models: Sequence[str] = ("ulite", "monai-unet"),
    budget_s: float = 300.0,
    data_dir: str = ".ulite_cache/bench_demo",
    lr: float | None = None,
    quick: bool = False,
    bundle: Any = None,
    device: str | torch.device = "cpu",
    amp: str = "none",
    patch: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train each model for ``budget_s`` with the bundle's data and settings, then report validation Dice.

    Args:
        models: keys of :data:`NETWORK_DEFS` (``"ulite"``: the bundle's network; ``"monai-unet"``: channels
            16..256, strides 2, 2 residual units).
        budget_s: training budget per model: process CPU seconds on the CPU, wall seconds on CUDA.
        data_dir: the bundle's ``dataset_dir`` (the demo data is generated there on first use).
        lr: the bundle's ``learning_rate`` for every model (default: the bundle's).
        quick: 2 training cases, 1 validation case (smoke test).
        bundle: a :class:`~ulite_monai.bundle.Bundle`, a folder, or ``None`` (located).
        device: ``"cpu"`` or a CUDA device; amp: ``"none"``, ``"fp16"``, ``"bf16"`` (CUDA only; inference in
            the pipeline autocasts to float16 whenever amp is on).
        patch: cubic training patch edge (the bundle's ``patch_size``; default: the bundle's).

    Raises:
        FileNotFoundError: no bundle; ValueError: an unknown model or a label off its image's grid.
    """
    from monai.utils import set_determinism

    from ulite_monai.bench import device as D
    from ulite_monai.bench.measure import param_count

    unknown = [m for m in models if m not in NETWORK_DEFS]
    if unknown:
        raise ValueError(f"unknown quality model(s) {', '.join(unknown)}; choose from {', '.join(NETWORK_DEFS)}.")
    dev = torch.device(device)
    amp = D.check_amp(dev, amp)
    base = _bundle(bundle)
    settings: dict[str, Any] = {"dataset_dir": str(Path(data_dir).resolve()), "device": f"$torch.device('{dev}')",
                                "amp": amp != "none"}
    if quick:
        settings.update(num_train_cases=2, num_val_cases=1)
    if lr is not None:
        settings["learning_rate"] = float(lr)
    parser = base.parser("train", **settings)
    if patch:
        settings["patch_size"] = [int(patch)] * base.info(parser).spatial_dims
        parser = base.parser("train", **settings)
    val_list = parser.get_parsed_content("val_datalist")
    n_val = parser.get_parsed_content("num_val_cases")
    val_list = val_list[:n_val] if n_val else val_list
    log(f"[quality] caching the bundle's training dataset ({base.root}) ...")
    loader = parser.get_parsed_content("train#dataloader")
    if dev.type == "cpu":
        clock, clock_name = time.process_time, "process CPU time"
    else:
        clock, clock_name = time.perf_counter, "wall time"
    runs = []
    with tempfile.TemporaryDirectory(prefix="ulite_quality_") as tmp:
        for name in models:
            net_def = NETWORK_DEFS[name]
            mb = _bundle(base, {"network_def": net_def} if net_def is not None else None)
            set_determinism(seed=0)
            mparser = mb.parser("train", **settings)
            net = mparser.get_parsed_content("network")
            opt = mparser.get_parsed_content("optimizer")
            loss_fn = mparser.get_parsed_content("loss")
            scaler = D.grad_scaler(dev, amp)
            net.train()
            log(f"[quality] training {name} for {budget_s:.0f} s of {clock_name} on {dev} ...")
            steps, last_loss = 0, float("nan")
            t0, wall0 = clock(), time.perf_counter()
            done = False
            while not done:
                for batch in loader:
                    x, y = batch["image"].to(dev), batch["label"].to(dev)
                    opt.zero_grad(set_to_none=True)
                    with D.autocast(dev, amp):
                        loss = loss_fn(net(x), y)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    steps += 1
                    last_loss = float(loss.detach())  # on CUDA: waits for the step, so the wall clock is right
                    if clock() - t0 >= budget_s:
                        done = True
                        break
            used_s, wall_s = clock() - t0, time.perf_counter() - wall0
            net.eval()
            ckpt = Path(tmp) / f"{name}.pt"
            torch.save(net.state_dict(), ckpt)
            log(f"[quality] {name}: Dice of {len(val_list)} validation case(s) through the bundle's inference "
                "pipeline ...")
            rec = {"model": name, "label": _LABELS[name], "params": param_count(net), "steps": steps,
                   "budget_used_s": used_s, "cpu_s": used_s if dev.type == "cpu" else None, "wall_s": wall_s,
                   "last_loss": last_loss, "status": "ok"}
            try:
                dice = _evaluate(mb, ckpt, val_list, dev, amp, Path(tmp) / name)
                rec.update(dice_per_case=dice, dice_mean=sum(dice) / max(1, len(dice)))
                log(f"[quality]   {steps} steps, {used_s:.0f} s {clock_name}, {wall_s:.0f} s wall, "
                    f"Dice {rec['dice_mean']:.3f}")
            except Exception as e:  # noqa: BLE001 - keep the other models' results; the report says what failed
                rec.update(status="error", dice_per_case=[], dice_mean=None,
                           note=f"evaluation through the bundle's pipeline failed: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:300]}")
                log(f"[quality]   {rec['note']}")
            runs.append(rec)
            del net, opt
    set_determinism(seed=None)
    p = parser.get_parsed_content
    return {
        "budget_s": budget_s, "budget_clock": clock_name, "budget_cpu_s": budget_s if dev.type == "cpu" else None,
        "device": str(dev), "amp": amp,
        "data": (f"bundle {base.root}: train.json datalists ({settings['dataset_dir']}), train#dataloader, loss, "
                 "optimizer; Dice through inference.json's pipeline on each image's own grid"),
        "num_train": len(loader.dataset), "num_val": len(val_list), "lr": float(p("learning_rate")),
        "batch_size": int(p("batch_size")), "patch_size": list(p("patch_size")), "roi_size": list(p("roi_size")),
        "runs": runs,
    }
