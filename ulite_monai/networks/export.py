# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Export U-Lite for deployment: TorchScript and ONNX (dynamic batch and spatial axes)."""

from __future__ import annotations

import copy
import os
import warnings

import torch
import torch.nn as nn

from ulite_monai.networks.fusion import inference_network
from ulite_monai.utils import save_atomically

__all__ = ["export_torchscript", "export_onnx", "onnx_session"]


def export_torchscript(net: nn.Module, path: str | os.PathLike, fuse: bool = True) -> torch.jit.ScriptModule:
    """Script ``net`` (fused for inference by default) and save it atomically to ``path``.

    The scripted module keeps ``net``'s device and dtype (``torch.jit.load(path, map_location=...)`` moves
    it). An unfused :class:`~ulite_monai.networks.ULite` is scripted with its reference computation.
    """
    model = inference_network(net, fuse=fuse, tune_allocator=False)
    scripted = torch.jit.script(model)
    save_atomically(scripted.save, path)
    return scripted


def export_onnx(
    net: nn.Module,
    path: str | os.PathLike,
    spatial_size: tuple[int, ...] | None = None,
    fuse: bool = True,
    opset_version: int = 18,
    input_name: str = "image",
    output_name: str = "pred",
    channels_last: bool = False,
) -> str:
    """Export ``net`` to ONNX with dynamic batch and spatial axes (``torch.onnx`` dynamo exporter).

    Args:
        net: a ULite (fused before export by default) or any network with ``spatial_dims``/``in_channels``.
        path: the ``.onnx`` file to write (atomically).
        spatial_size: example spatial size used for tracing (default 64 per dim); any size works afterwards.
        fuse: export the fused inference network.
        opset_version: ONNX opset (>= 17).
        channels_last: export the fused graph's channels-last form. Off by default: ONNX Runtime's CPU
            kernels work in NCHW and pick their own layouts, and the NCHW graph ran faster there.

    The network may be on any device: the export traces a CPU copy (``net`` itself is not moved).
    """
    if opset_version < 17:
        raise ValueError(f"opset_version must be >= 17, got {opset_version}.")
    model = inference_network(net, fuse=fuse, channels_last=channels_last, tune_allocator=False)
    if any(t.device.type != "cpu" for t in list(model.parameters()) + list(model.buffers())):
        model = copy.deepcopy(model).cpu()  # a copy: with fuse=False, model is the caller's network
    dims = int(getattr(model, "spatial_dims", 2))
    in_ch = int(getattr(model, "in_channels", 1))
    size = tuple(spatial_size) if spatial_size is not None else (64,) * dims
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    # batch 2 and unequal sizes so the exporter cannot specialise a dim to a constant
    example = torch.randn(2, in_ch, *[s + 32 * i for i, s in enumerate(size)], dtype=dtype)
    names = ["d", "h", "w"][-dims:] if dims <= 3 else [f"s{i}" for i in range(dims)]
    dynamic = {0: torch.export.Dim("batch")}
    for i, n in enumerate(names):
        dynamic[2 + i] = torch.export.Dim(n, min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset_version,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes={"x": dynamic},
            verbose=False,
        )
    return save_atomically(prog.save, path)


def onnx_session(path: str | os.PathLike, threads: int | None = None, spin: bool = False):
    """An ONNX Runtime CPU inference session for an exported model.

    ``spin=False`` stops ORT's worker threads from busy-waiting after each run, so they do not steal the
    CPU from whatever runs next in the same process (torch, data loading, another model in a benchmark).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(os.fspath(path), sess_options=opts, providers=["CPUExecutionProvider"])
