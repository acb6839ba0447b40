# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Training-step mode: forward, loss, backward and optimiser step of U-Lite and its peers, side by side.

Workloads (:data:`WORKLOADS`):

- ``3d``: 4x1x96x96x96, two classes (DiceCE, softmax), AdamW; U-Lite at the bundle's widths (the ``features``
  of its ``network_def``: 8..128) against MONAI UNet (16..256, strides 2, 2 residual units);
- ``2d``: 8x3x256x256, one logit (DiceCE, sigmoid), AdamW; U-Lite at the paper's widths (16..512) against
  MONAI UNet;
- ``bundle``: the bundle's own step (``train.json`` through :class:`~ulite_monai.bundle.Bundle`): its
  ``network``, ``loss`` and ``optimizer`` (AdamW at its ``learning_rate``), a batch of ``batch_size *
  num_samples`` patches of ``patch_size``; MONAI UNet swaps only ``network_def``.

Models (:data:`TRAIN_MODELS`): ``ulite``, ``monai-unet``, and variants with the network and its input in
channels-last memory format (``-cl``) or the network under ``torch.compile`` (``-compile``);
``ulite-reference`` is U-Lite with ``axial_impl="reference"`` (the reference code's computation, same
parameters), to show what the default ``axial_impl="auto"`` gains (see :mod:`ulite_monai.networks.axial`);
``ulite-triton`` is U-Lite with ``axial_impl="triton"`` (the Triton axial kernels; CUDA).

A step is what MONAI's ``SupervisedTrainer`` does (:func:`ulite_monai.bench.workloads.make_step`): zero the
gradients, forward and loss under autocast (``--amp``), backward and optimiser step through a ``GradScaler``
(enabled for fp16). Inputs and targets are random (fixed seeds), built once per workload on the device. All
models of a workload live in one process and are timed interleaved, one step per model per round, after
warm-up steps; medians are reported. Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` during one
step minus what was allocated before the model was built, plus the batch: weights, gradients, optimiser state,
activations and batch; on the CPU the growth of the process's resident set during one step (after handing
freed heap pages back), which is the step's working memory. On the CPU the mode sets glibc's allocator as the
bundles' training configs do (:func:`ulite_monai.utils.tune_cpu_allocator`, unless ``ULITE_TUNE_ALLOCATOR=0``) and
records the setting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ulite_monai.bench import measure
from ulite_monai.bench import device as D
from ulite_monai.networks.utils import channels_last_format
from ulite_monai.utils import allocator_settings, tune_cpu_allocator

__all__ = ["WORKLOADS", "TRAIN_MODELS", "run_training_step"]

#: workload name -> what it is
WORKLOADS = {
    "3d": "3D 4x1x96^3, 2 classes, DiceCE + AdamW; U-Lite at the bundle's widths",
    "2d": "2D 8x3x256x256, 1 logit, DiceCE + AdamW; U-Lite at the paper's widths",
    "bundle": "the bundle's training step (train.json: network, loss, optimizer, batch_size x num_samples patches)",
}

#: model name -> (family, channels-last, torch.compile, label)
TRAIN_MODELS: dict[str, tuple[str, bool, bool, str]] = {
    "ulite": ("ulite", False, False, "U-Lite"),
    "ulite-cl": ("ulite", True, False, "U-Lite channels-last"),
    "ulite-compile": ("ulite", False, True, "U-Lite + torch.compile"),
    "ulite-reference": ("ulite-reference", False, False, "U-Lite, reference axial convs"),
    "ulite-triton": ("ulite-triton", False, False, "U-Lite, Triton axial kernels"),
    "monai-unet": ("monai-unet", False, False, "MONAI UNet"),
    "monai-unet-cl": ("monai-unet", True, False, "MONAI UNet channels-last"),
    "monai-unet-compile": ("monai-unet", False, True, "MONAI UNet + torch.compile"),
}

#: U-Lite families that set ``axial_impl``
_AXIAL_IMPL = {"ulite-reference": "reference", "ulite-triton": "triton"}

_UNET = {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2}


@dataclass
class _Workload:
    name: str
    dims: int
    batch: int
    size: tuple[int, ...]
    in_channels: int
    out_channels: int
    description: str
    build: Callable[[str, torch.device], tuple[nn.Module, Callable, torch.optim.Optimizer]]
    optimizer: str
    loss: str


def _loss(out_channels: int):
    from monai.losses import DiceCELoss

    if out_channels == 1:
        return DiceCELoss(sigmoid=True)
    return DiceCELoss(softmax=True, to_onehot_y=True)


def _synthetic(name: str, dims: int, batch: int, size: Sequence[int], cin: int, cout: int,
               features: Sequence[int] | None, description: str) -> _Workload:
    from monai.networks.nets import UNet

    from ulite_monai.networks import ULite

    def build(family: str, dev: torch.device):
        torch.manual_seed(0)
        if family.startswith("ulite"):
            kwargs = {"features": tuple(int(f) for f in features)} if features else {}
            net = ULite(spatial_dims=dims, in_channels=cin, out_channels=cout,
                        axial_impl=_AXIAL_IMPL.get(family, "auto"), **kwargs)
        else:
            net = UNet(dims, cin, cout, **_UNET)
        net = net.to(dev)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
        return net, _loss(cout), opt

    return _Workload(name, dims, batch, tuple(size), cin, cout, description, build,
                     "AdamW(lr=1e-3, weight_decay=1e-4)",
                     "DiceCELoss(sigmoid=True)" if cout == 1 else "DiceCELoss(softmax=True, to_onehot_y=True)")


def _bundle_workload(bundle, dev: torch.device, quick: bool) -> _Workload:
    from ulite_monai.bench.quality import NETWORK_DEFS, _bundle

    settings: dict[str, Any] = {"device": f"$torch.device('{dev}')"}
    parser = bundle.parser("train", **settings)
    info = bundle.info(parser)
    # the size of a training batch's images: the 3D bundle's random patches, or the 2D bundle's resized slices
    size_key = next((k for k in ("patch_size", "image_size") if k in parser), None)
    if size_key is None or "batch_size" not in parser:
        raise ValueError(f"bundle {bundle.root}: configs/train.json needs batch_size and patch_size (or image_size, "
                         "for a bundle that trains on whole resized images) for the training-step workload 'bundle'; "
                         "add them or leave 'bundle' out of --train-workloads.")
    if quick:  # one image of twice U-Lite's size divisor: 2 values per axis and channel for the deepest batch norms
        features = _bundle_features(bundle, parser)
        edge = 2 ** len(features) if features else 32
        settings.update(batch_size=1, **{size_key: [edge] * info.spatial_dims})
        parser = bundle.parser("train", **settings)
    p = parser.get_parsed_content
    batch = int(p("batch_size")) * int(p("num_samples") if "num_samples" in parser else 1)
    size = tuple(int(s) for s in p(size_key))

    def build(family: str, dev: torch.device):
        if family in _AXIAL_IMPL:
            mb = _bundle(bundle, {"network_def#axial_impl": _AXIAL_IMPL[family]})
        else:
            net_def = NETWORK_DEFS[family]
            mb = _bundle(bundle, {"network_def": net_def} if net_def is not None else None)
        torch.manual_seed(0)
        mp = mb.parser("train", **settings)
        net = mp.get_parsed_content("network")
        return net, mp.get_parsed_content("loss"), mp.get_parsed_content("optimizer")

    opt = parser["optimizer"]
    return _Workload(
        "bundle", info.spatial_dims, batch, size, info.in_channels, info.out_channels,
        f"the bundle's step ({bundle.root}/configs/train.json): batch_size {p('batch_size')} x num_samples "
        f"{batch // int(p('batch_size'))} {'patches' if size_key == 'patch_size' else 'images'} of "
        f"{'x'.join(map(str, size))}", build,
        f"{opt.get('_target_', '?')}(lr={p('learning_rate')}, weight_decay={opt.get('weight_decay', '-')})",
        str(parser["loss"].get("_target_", "?")))


def _bundle_features(bundle, parser=None) -> list[int] | None:
    """The ``features`` of the bundle's ``network_def`` when it is a ULite (``parser``: its train config, if read)."""
    parser = parser if parser is not None else bundle.parser("train")
    target = str(parser["network_def"].get("_target_", "")) if isinstance(parser["network_def"], dict) else ""
    if target.endswith("ULite") and "network_def#features" in parser:
        return [int(f) for f in parser.get_parsed_content("network_def#features")]
    return None


def _workloads(names: Sequence[str], bundle_factory: Callable[[], Any], dev: torch.device,
               quick: bool) -> list[_Workload]:
    out = []
    for name in names:
        if name == "3d":
            features = _bundle_features(bundle_factory())
            batch, size = (1, (32,) * 3) if quick else (4, (96,) * 3)
            desc = (f"3D {batch}x1x{'x'.join(map(str, size))}, 2 classes; U-Lite features "
                    + (f"{tuple(features)} (the bundle's network_def)" if features else
                       "(16..512: the bundle's network is not U-Lite)"))
            out.append(_synthetic("3d", 3, batch, size, 1, 2, features, desc))
        elif name == "2d":
            batch, size = (2, (32, 32)) if quick else (8, (256, 256))
            out.append(_synthetic("2d", 2, batch, size, 3, 1, None,
                                  f"2D {batch}x3x{'x'.join(map(str, size))}, 1 logit; U-Lite paper widths (16..512)"))
        elif name == "bundle":
            out.append(_bundle_workload(bundle_factory(), dev, quick))
        else:
            raise ValueError(f"unknown training workload {name!r}; choose from {', '.join(WORKLOADS)}.")
    return out


def _ratios(results: list[dict]) -> list[dict]:
    """U-Lite step time against MONAI UNet's in the same run: ``speedup = t(UNet) / t(U-Lite)`` (above 1: U-Lite is
    faster), for each U-Lite variant against the plain UNet and against the UNet of the same variant."""
    by = {r["model"]: r for r in results if r.get("step")}
    out = []
    for name, r in by.items():
        if not TRAIN_MODELS[name][0].startswith("ulite"):
            continue
        peers = ["monai-unet"] + ([name.replace("ulite", "monai-unet", 1)] if name != "ulite" else [])
        for peer in dict.fromkeys(peers):
            if peer in by:
                out.append({"model": name, "versus": peer,
                            "speedup": by[peer]["step"]["median_ms"] / r["step"]["median_ms"]})
    return out


def run_training_step(
    models: Sequence[str] = ("ulite", "monai-unet"),
    workloads: Sequence[str] = ("3d", "2d", "bundle"),
    device: str | torch.device = "cpu",
    amp: str = "none",
    repeats: int = 10,
    warmup: int = 2,
    quick: bool = False,
    bundle: Any = None,
    max_model_s: float = 300.0,
    log: Callable[[str], None] = print,
) -> dict:
    """Time one training step of each model on each workload (see the module docstring).

    Args:
        models: keys of :data:`TRAIN_MODELS`.
        workloads: keys of :data:`WORKLOADS`.
        device: ``"cpu"`` or a CUDA device; amp: ``"none"``, ``"fp16"``, ``"bf16"`` (CUDA only).
        repeats: timed steps per model (fewer for a model whose steps would pass half of ``max_model_s``, at
            least 3).
        warmup: untimed steps per model first (at least 3 on CUDA: cuDNN autotuning, allocator growth).
        quick: small batches and sizes (smoke test).
        bundle: a :class:`~ulite_monai.bundle.Bundle`, a folder or ``None`` (located) for the bundle's widths
            (``3d``) and step (``bundle``).
        max_model_s: time budget per model and workload.

    Raises:
        ValueError: an unknown model or workload, or ``amp`` on the CPU; FileNotFoundError: no bundle.
    """
    from ulite_monai.bench.speed import _rounds, interleave
    from ulite_monai.bench.workloads import make_input, make_labels, make_step

    unknown = [m for m in models if m not in TRAIN_MODELS]
    if unknown:
        raise ValueError(f"unknown training model(s) {', '.join(unknown)}; choose from {', '.join(TRAIN_MODELS)}.")
    dev = torch.device(device)
    amp = D.check_amp(dev, amp)
    timer = D.Timer(dev)
    cache: dict[str, Any] = {}

    def get_bundle():
        if "b" not in cache:
            from ulite_monai.bench.quality import _bundle

            cache["b"] = _bundle(bundle)
        return cache["b"]

    warm = max(1, warmup, 3 if dev.type == "cuda" else 1)
    if dev.type == "cpu":  # as the training configs do: keep the step's freed memory for the next step
        tune_cpu_allocator()
    out = {"device": str(dev), "amp": amp, "threads": torch.get_num_threads(), "allocator": allocator_settings(),
           "load_average_start": measure.load_average(), "workloads": []}
    for wl in _workloads(workloads, get_bundle, dev, quick):
        shape = [wl.batch, wl.in_channels, *wl.size]
        log(f"[train] {wl.name}: {wl.description} on {dev} (amp {amp}) ...")
        x = make_input(wl.dims, wl.batch, wl.size, device=dev, channels=wl.in_channels)
        y = make_labels(x, wl.out_channels)
        batch_mb = (x.numel() * x.element_size() + y.numel() * y.element_size()) / 2**20
        recs: dict[str, dict] = {}
        steps: dict[str, Callable[[], object]] = {}
        for name in models:
            family, cl, compiled, label = TRAIN_MODELS[name]
            rec = recs[name] = {"model": name, "label": label, "status": "ok", "notes": [],
                                "family": "ulite" if family.startswith("ulite") else "monai"}
            try:
                before = D.gpu_allocated_mb(dev)
                net, loss_fn, opt = wl.build(family, dev)
                rec["params"] = measure.param_count(net)
                xi = x
                if cl:
                    fmt = channels_last_format(wl.dims)
                    net = net.to(memory_format=fmt)
                    xi = x.contiguous(memory_format=fmt)
                fwd = torch.compile(net) if compiled else net
                step = make_step(fwd, xi, y, loss_fn, opt, amp)
                t0 = time.perf_counter()
                for _ in range(warm):
                    step()
                D.synchronize(dev)
                rec["warmup_s"] = time.perf_counter() - t0
                if dev.type == "cuda":
                    D.reset_gpu_peak(dev)
                    rec["probe_s"] = timer(step)
                    rec["peak_gpu_mb"] = D.gpu_peak_mb(dev) - before + batch_mb
                else:
                    measure.trim_heap()
                    can_reset = measure.reset_peak_rss()
                    base = measure.rss_mb()
                    rec["probe_s"] = timer(step)
                    if can_reset:
                        rec["step_rss_growth_mb"] = measure.peak_rss_mb() - base
                steps[name] = step
                log(f"[train]   {name}: {rec['probe_s'] * 1000:.1f} ms per step after {warm} warm-up steps")
            except Exception as e:  # noqa: BLE001 - out of memory, compile failure: record and go on
                rec["status"] = "skipped"
                rec["notes"].append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                log(f"[train]   {name} skipped: {rec['notes'][-1]}")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        if steps:
            rounds = {n: _rounds(repeats, recs[n]["probe_s"], max_model_s / 2, minimum=min(3, repeats)) for n in steps}
            log(f"[train] {wl.name}: interleaved, up to {repeats} steps per model ...")
            times, _ = interleave(steps, rounds, timer=timer)
            for n in steps:
                s = measure.summarise(times[n])
                recs[n]["step"] = s
                recs[n]["samples_per_s"] = wl.batch / (s["median_ms"] / 1000.0)
        results = [recs[n] for n in models]
        out["workloads"].append({
            "name": wl.name, "description": wl.description, "dims": wl.dims, "input_shape": shape,
            "optimizer": wl.optimizer, "loss": wl.loss, "results": results, "ratios": _ratios(results)})
        del steps, x, y
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out["load_average_end"] = measure.load_average()
    return out
