# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""U-Lite's axial depthwise convolution ``x + bias + sum_axis dwconv_axis(x)`` as Triton kernels (2D and 3D).

One pass computes the identity, the bias and every axis's taps of a channels-last block: each output reads
its ``2 * K`` (2D) or ``3 * K`` (3D) neighbours along the axes from the cache and the tensor is read once from
memory and written once, where PyTorch's 3D depthwise convolutions (one per axis, plus the sum) read and write
it four times and fall back to generic kernels. The backward pass uses the same kernel for the input gradient
(``g + sum_axis dwconv_axis(g)`` with each axis's taps reversed) and a second kernel for the weight and bias
gradients, which sums ``g * shifted x`` over blocks of voxels into per-block partial sums that one
``torch.sum`` reduces. Accumulation is in float32 whatever the storage dtype; under autocast the kernels run
in the autocast dtype, as ``F.conv3d`` would.

Used by ``ULite(axial_impl="triton")`` (opt-in; see :mod:`ulite_monai.networks.axial`). It runs where Triton
runs: CUDA devices, and the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is
imported), which is how the project's CPU tests check it. Measure it against the other implementations with
``python -m ulite_monai.bench --device cuda --modes train --train-models ulite ulite-triton monai-unet``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch

__all__ = ["triton_available", "axial_triton"]

_TRITON: dict[str, object] = {}


def triton_available() -> bool:
    """Whether the ``triton`` package imports (the kernels also need a CUDA device or ``TRITON_INTERPRET=1``)."""
    if "ok" not in _TRITON:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON["ok"] = True
        except Exception as e:  # ImportError, or a broken install raising on import
            _TRITON["ok"] = False
            _TRITON["error"] = f"{type(e).__name__}: {e}"
    return bool(_TRITON["ok"])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def _check_device(x: torch.Tensor) -> None:
    if not triton_available():
        raise RuntimeError(
            "axial_impl='triton' needs the triton package (pip install triton; it comes with CUDA builds of "
            f"PyTorch on Linux): {_TRITON.get('error', 'not importable')}. Use axial_impl='auto' instead.")
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpreting()):
        raise RuntimeError(
            f"axial_impl='triton' runs on CUDA devices (or on the CPU under TRITON_INTERPRET=1, slowly); the input "
            f"is on {x.device}. Use axial_impl='auto' there.")


def _kernels():
    """The forward and weight-gradient kernels (their module is imported on first use)."""
    from ulite_monai.networks import _triton_kernels as kern

    return kern.axial_fwd, kern.axial_wgrad


def _on_device(x: torch.Tensor):
    """Launch on ``x``'s GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _blocks(c: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): up to 64 channels per program, about 4096 elements per program."""
    block_c = min(64, 1 << max(0, (int(c) - 1).bit_length()))
    return max(16, 4096 // block_c), block_c


def _geometry(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(P, C, D, H, W) of a 2D (D = 1) or 3D batch."""
    c = x.shape[1]
    if x.dim() == 4:
        n, _, h, w = x.shape
        d = 1
    else:
        n, _, d, h, w = x.shape
    return n * d * h * w, c, d, h, w


def _launch_fwd(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """``x + bias + sum_axis taps_axis * x`` for channels-last ``x``; ``taps``: ``(NAX, K, C)`` float32."""
    fwd, _ = _kernels()
    p, c, d, h, w = _geometry(x)
    out = torch.empty_like(x)
    bp, bc = _blocks(c)
    grid = ((p + bp - 1) // bp, (c + bc - 1) // bc)
    b = bias.float().contiguous() if bias is not None else taps  # a dummy pointer when there is no bias
    with _on_device(x):
        fwd[grid](x, taps, b, out, p, c, d, h, w, int(dilation), K=taps.shape[1], NAX=taps.shape[0],
                  HAS_BIAS=bias is not None, BLOCK_P=bp, BLOCK_C=bc)
    return out


def _launch_wgrad(g: torch.Tensor, x: torch.Tensor, nax: int, k: int, dilation: int) -> torch.Tensor:
    """``(NAX * K + 1, C)`` float32: per tap ``sum g * shifted x``, then ``sum g`` (the bias gradient)."""
    _, wgrad = _kernels()
    p, c, d, h, w = _geometry(x)
    bp, bc = _blocks(c)
    grid = ((p + bp - 1) // bp, (c + bc - 1) // bc)
    part = torch.empty(grid[0], nax * k + 1, c, dtype=torch.float32, device=x.device)
    with _on_device(x):
        wgrad[grid](g, x, part, p, c, d, h, w, int(dilation), K=k, NAX=nax, BLOCK_P=bp, BLOCK_C=bc)
    return part.sum(0)


def _taps(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-axis depthwise weights ``(C, 1, ..K along axis a..)`` -> ``(NAX, K, C)`` float32."""
    c = weights[0].shape[0]
    return torch.stack([w.reshape(c, -1).t() for w in weights]).float().contiguous()


class _TritonAxial(torch.autograd.Function):
    """``x + bias + sum_axis dwconv_axis(x)`` with the Triton kernels; gradients for ``x``, the bias and every
    axis's weights."""

    @staticmethod
    def forward(ctx, x, bias, dilation, *weights):  # noqa: D102 - see class doc
        from ulite_monai.networks.axial import _autocast_off, _compute_dtype
        from ulite_monai.networks.utils import channels_last_format

        nd = x.dim() - 2
        dtype = _compute_dtype(x)
        with _autocast_off(x.device.type):
            xc = x.to(dtype).contiguous(memory_format=channels_last_format(nd))
            taps = _taps(weights)
            out = _launch_fwd(xc, taps, bias, dilation)
        ctx.save_for_backward(xc, taps)
        ctx.dilation = int(dilation)
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype, [w.dtype for w in weights])
        ctx.shapes = [w.shape for w in weights]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102 - see class doc
        from ulite_monai.networks.utils import channels_last_format

        xc, taps = ctx.saved_tensors
        x_dtype, b_dtype, w_dtypes = ctx.dtypes
        need = ctx.needs_input_grad
        nax, k, _ = taps.shape
        g = grad.to(xc.dtype).contiguous(memory_format=channels_last_format(xc.dim() - 2))
        gx = gb = None
        if need[0]:  # the adjoint of the taps is the same stencil with each axis's taps reversed
            gx = _launch_fwd(g, taps.flip(1).contiguous(), None, ctx.dilation).to(x_dtype)
        grads_w: list[torch.Tensor | None] = [None] * nax
        if any(need[3:]) or (b_dtype is not None and need[1]):
            sums = _launch_wgrad(g, xc, nax, k, ctx.dilation)
            for a in range(nax):
                if need[3 + a]:
                    grads_w[a] = sums[a * k:(a + 1) * k].t().reshape(ctx.shapes[a]).to(w_dtypes[a])
            if b_dtype is not None and need[1]:
                gb = sums[-1].to(b_dtype)
        return (gx, gb, None, *grads_w)


def axial_triton(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                 dilations: Sequence[int]) -> torch.Tensor:
    """``x + sum_axis dwconv_axis(x)`` for a 2D or 3D batch with the Triton kernels (channels-last result).

    Arguments as in :func:`ulite_monai.networks.axial.axial_merged`; all axes must share one dilation (as in
    U-Lite's blocks) and one (odd) kernel length.

    Raises:
        RuntimeError: Triton is missing, or ``x`` is on a device Triton does not run on.
        ValueError: the axes have different dilations or kernel lengths, or ``x`` is not 2D/3D.
    """
    nd = x.dim() - 2
    if nd not in (2, 3) or len(weights) != nd:
        raise ValueError(f"axial_triton needs a 2D or 3D batch and one weight per axis, got input {tuple(x.shape)} "
                         f"and {len(weights)} weights.")
    if len({int(d) for d in dilations}) != 1:
        raise ValueError(f"axial_triton needs one dilation for every axis, got {list(dilations)}.")
    if len({w.numel() for w in weights}) != 1:
        raise ValueError("axial_triton needs the same kernel length on every axis.")
    _check_device(x)
    bias = None
    for b in biases:
        if b is not None:
            bias = b if bias is None else bias + b
    return _TritonAxial.apply(x, bias, int(dilations[0]), *weights)
