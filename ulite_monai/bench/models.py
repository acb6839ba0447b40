# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The networks the benchmark compares: U-Lite variants and the MONAI networks a user would pick instead.

Every entry is built by name for a number of spatial dims; the shapes follow the paper's 2D setup
(3-channel RGB in, 1 logit out) and a CT-like 3D setup (1 channel in, 2 classes out).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

__all__ = ["ModelSpec", "MODELS", "DEFAULT_MODELS", "io_channels", "input_shape", "build_model", "OrtModule"]

#: (in_channels, out_channels) per spatial dims
_IO = {2: (3, 1), 3: (1, 2)}
#: benchmark input size per spatial dims (batch 1)
_SIZE = {2: (256, 256), 3: (128, 128, 128)}


def io_channels(dims: int) -> tuple[int, int]:
    """``(in_channels, out_channels)`` used for ``dims`` spatial dimensions."""
    return _IO[dims]


def input_shape(dims: int, batch: int = 1, size: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Benchmark input shape ``(batch, in_channels, *size)``; ``size`` defaults to 256^2 (2D) / 128^3 (3D)."""
    return (batch, _IO[dims][0]) + tuple(size or _SIZE[dims])


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked network.

    Attributes:
        name: command-line name.
        label: name shown in tables and plots.
        family: ``"ulite"`` or ``"monai"``.
        trainable: whether a training step is measured (eval-only variants are not trained).
        runtime: ``"torch"``, ``"torch.compile"`` or ``"onnxruntime"``.
        description: how it is built, for the report.
    """

    name: str
    label: str
    family: str
    trainable: bool
    runtime: str
    description: str


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("ulite", "U-Lite (unfused)", "ulite", True, "torch",
                  "ULite(axial_impl='reference'), eval mode, NCHW: the reference structure with BatchNorm"),
        ModelSpec("ulite-default", "U-Lite (default)", "ulite", True, "torch",
                  "ULite() defaults, not fused: axial_impl='auto' (on the CPU the fused training kernels, "
                  "channels-last); the network users and the bundle train"),
        ModelSpec("ulite-fused", "U-Lite fused", "ulite", False, "torch",
                  "fuse_ulite(net) defaults: BN folded, axial blocks merged (2D), channels-last"),
        ModelSpec("ulite-fused-nchw", "U-Lite fused NCHW", "ulite", False, "torch",
                  "fuse_ulite(net, channels_last=False)"),
        ModelSpec("ulite-fused-compile", "U-Lite fused + compile", "ulite", False, "torch.compile",
                  "torch.compile(fuse_ulite(net), dynamic=False) (inductor, default mode)"),
        ModelSpec("ulite-onnx", "U-Lite fused ONNX Runtime", "ulite", False, "onnxruntime",
                  "fuse_ulite(net) exported by torch.onnx.export (opset 18, dynamic batch/spatial axes), "
                  "CPUExecutionProvider"),
        ModelSpec("monai-unet", "MONAI UNet", "monai", True, "torch",
                  "UNet(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)"),
        ModelSpec("basicunet", "MONAI BasicUNet", "monai", True, "torch", "BasicUNet() defaults"),
        ModelSpec("attentionunet", "MONAI AttentionUnet", "monai", True, "torch",
                  "AttentionUnet(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))"),
        ModelSpec("segresnet", "MONAI SegResNet", "monai", True, "torch", "SegResNet() defaults (init_filters=8)"),
        ModelSpec("unetr", "MONAI UNETR", "monai", True, "torch",
                  "UNETR(img_size=input size) defaults (ViT-B/16, feature_size=16)"),
        ModelSpec("swinunetr", "MONAI SwinUNETR", "monai", True, "torch", "SwinUNETR(feature_size=48)"),
        ModelSpec("classic-unet", "classic U-Net", "monai", True, "torch",
                  "BasicUNet(features=(64, 128, 256, 512, 1024, 64)): the original U-Net widths"),
    ]
}

DEFAULT_MODELS = tuple(MODELS)


class OrtModule:
    """Callable wrapper that runs an exported ONNX model with ONNX Runtime on CPU, tensors in and out.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (``torch.get_num_threads()`` by default, so runtimes compare fairly).
    """

    def __init__(self, path: str, threads: int | None = None) -> None:
        from ulite_monai.networks import onnx_session

        # spinning off (onnx_session's default): busy ORT threads would slow the next model in the interleaved loop
        self.session = onnx_session(path, threads=int(threads or torch.get_num_threads()))
        self.input_name = self.session.get_inputs()[0].name
        self.path = path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)

    def eval(self) -> "OrtModule":
        return self


def export_onnx(net: nn.Module, dims: int, path: str) -> str:
    """Export ``net`` (eval) to ONNX at ``path`` with dynamic batch and spatial axes; returns ``path``.

    The TorchScript-based exporter is tried first (fast); the ``torch.export``-based one is the fallback.
    """
    x = torch.randn(input_shape(dims, 1, (64,) * dims))
    axes = {0: "batch"} | {2 + i: f"spatial{i}" for i in range(dims)}
    kwargs = dict(input_names=["image"], output_names=["logits"], opset_version=18,
                  dynamic_axes={"image": axes, "logits": axes})
    import contextlib
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net, (x,), path, dynamo=False, **kwargs)
        except Exception:  # noqa: BLE001 - fall back to the torch.export-based exporter
            torch.onnx.export(net, (x,), path, dynamo=True, verbose=False, **kwargs)
    return path


def _ulite(dims: int, features: Sequence[int] | None = None, axial_impl: str = "auto") -> nn.Module:
    from ulite_monai.networks import ULite

    cin, cout = _IO[dims]
    kwargs = {"features": tuple(int(f) for f in features)} if features else {}
    return ULite(spatial_dims=dims, in_channels=cin, out_channels=cout, axial_impl=axial_impl, **kwargs)


def _randomise_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, as a trained network would have."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net


def _monai(name: str, dims: int, size: tuple[int, ...] | None = None) -> nn.Module:
    from monai.networks import nets

    cin, cout = _IO[dims]
    size = tuple(size or _SIZE[dims])
    if name == "monai-unet":
        return nets.UNet(dims, cin, cout, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    if name == "basicunet":
        return nets.BasicUNet(spatial_dims=dims, in_channels=cin, out_channels=cout)
    if name == "attentionunet":
        return nets.AttentionUnet(dims, cin, cout, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))
    if name == "segresnet":
        return nets.SegResNet(spatial_dims=dims, in_channels=cin, out_channels=cout)
    if name == "unetr":
        return nets.UNETR(cin, cout, img_size=size, spatial_dims=dims)
    if name == "swinunetr":
        return nets.SwinUNETR(cin, cout, feature_size=48, spatial_dims=dims)
    if name == "classic-unet":
        return nets.BasicUNet(spatial_dims=dims, in_channels=cin, out_channels=cout,
                              features=(64, 128, 256, 512, 1024, 64))
    raise KeyError(name)


def build_model(name: str, dims: int, train: bool = False, workdir: str | None = None,
                size: tuple[int, ...] | None = None, features: Sequence[int] | None = None,
                device: torch.device | str | None = None) -> tuple[Callable, nn.Module]:
    """Build benchmark model ``name`` for ``dims`` spatial dims.

    Args:
        name: a key of :data:`MODELS`.
        dims: 2 or 3.
        train: return the trainable network in train mode (only for ``spec.trainable`` models).
        workdir: folder for exported files (ONNX); a temporary folder when not given.
        size: input spatial size (only UNETR depends on it); the benchmark size when not given.
        features: U-Lite ``features`` (default: the paper's ``(16, 32, 64, 128, 256, 512)``).
        device: where the network runs (default the CPU). Every network is built and fused on the CPU, then
            moved, so the result does not depend on where fusion ran.

    Returns:
        ``(callable, torch_module)``: what to time, and the torch module that defines it (parameters and
        FLOPs are counted on the latter; for ONNX Runtime it is the exported fused network).

    Raises:
        ValueError: ``ulite-onnx`` on a device other than the CPU (it runs ONNX Runtime's CPU provider).
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(MODELS)}.")
    if dims not in _IO:
        raise ValueError(f"dims must be 2 or 3, got {dims}.")
    spec = MODELS[name]
    device = torch.device(device or "cpu")
    if spec.runtime == "onnxruntime" and device.type != "cpu":
        raise ValueError(f"{name} runs ONNX Runtime's CPU provider; it is benchmarked on the CPU only.")
    torch.manual_seed(0)
    if train and not spec.trainable:
        raise ValueError(f"{name} is an inference-only variant; it has no training step.")
    if spec.family == "monai":
        net = _monai(name, dims, size).to(device)
        return (net, net.train()) if train else (net.eval(), net.eval())
    from ulite_monai.networks import fuse_ulite

    if name == "ulite":  # the reference code's computation (NCHW, one depthwise conv per axis), same parameters
        base = _randomise_bn(_ulite(dims, features, axial_impl="reference")).to(device)
        return (base.train(), base.train()) if train else (base.eval(), base.eval())
    if name == "ulite-default":  # what ULite() runs: the axial implementation chosen for the device
        base = _randomise_bn(_ulite(dims, features))
        base = base.to(device)  # before the implementation is resolved: it depends on the device
        return (base.train(), base.train()) if train else (base.eval(), base.eval())
    base = _randomise_bn(_ulite(dims, features))
    base.eval()
    if name == "ulite-fused-nchw":
        fused = fuse_ulite(base, channels_last=False).to(device)
        return fused, fused
    fused = fuse_ulite(base).to(device)
    if name == "ulite-fused":
        return fused, fused
    if name == "ulite-fused-compile":
        # static shapes: one process compiles the class's forward for 2D bs1, bs8 and 3D; automatic dynamic
        # shapes after the second shape hit an inductor lowering error on the 3D views (torch 2.13)
        return torch.compile(fused, dynamic=False), fused
    if name == "ulite-onnx":
        # exported from the NC... layout (ONNX has no memory formats; ONNX Runtime chooses its own layout)
        workdir = workdir or tempfile.mkdtemp(prefix="ulite_bench_")
        plain = fuse_ulite(base, channels_last=False)
        path = export_onnx(plain, dims, os.path.join(workdir, f"ulite_fused_{dims}d.onnx"))
        return OrtModule(path), plain
    raise KeyError(name)
