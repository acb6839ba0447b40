# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Fused CPU kernels for U-Lite training and inference (C++, built on first use with ``torch.utils.cpp_extension``).

The full-resolution stages of U-Lite (16-64 channels at 256^2 and 128^2 in the paper's 2D configuration, 8-32
channels in the 3D bundle) are memory-bound on the CPU, where every stock operator streams whole tensors through
memory. Four kernels (``csrc/cpu_kernels.cpp``) each replace a chain of them, forward and backward:

- :func:`encoder_tail`: an encoder's ``act(pool(pw(norm(y))))`` (GELU inside) and the skip ``norm(y)``;
- :func:`decoder_entry`: a decoder's ``norm(up2(lo) + pw_b(skip))`` (its 1x1 conv split as in
  :class:`~ulite_monai.networks.ULiteDecoderBlock`);
- :func:`pointwise_gelu`: a decoder's ``gelu(pw2(x))``;
- :func:`axial_conv`: the axial block ``x + sum_axis dwconv_axis(x)``.

Two more, forward only, serve the fused inference network (:class:`~ulite_monai.networks.fusion.FusedULite`):

- :func:`infer_encoder`: a whole encoder stage (axial block with the batch norm folded in, the stacked 1x1 convs,
  max-pool, activation), writing only the pooled output and the projected skip;
- :func:`infer_decoder`: a whole decoder stage (up-sampling add, axial block, 1x1 conv, GELU, optionally the
  network's output conv), writing only its output.

Outputs, gradients and running-statistics updates match the stock operators up to float rounding (the kernels treat
subnormal floats, below 1.2e-38, as zero: each one would cost a microcode assist); each function returns ``None``
where its kernel does not apply, and the caller runs the stock operators.

The extension is compiled once per machine and environment (each virtual environment, e.g. the project's and the
MONAI Label server's, has its own build) into PyTorch's extension cache (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``; about 45 s with a C++ compiler). ``python -m ulite_monai.networks.build_kernels``
builds it ahead of use (``make demo``/``make test`` run it). Without a compiler, or with ``ULITE_CPU_KERNELS=0``,
the stock operators run instead (one warning names the reason); on CPUs without AVX2 too, unless
``ULITE_CPU_KERNELS=1`` (:func:`kernels_enabled`). The vector width follows the CPU the build is for (16 floats
with AVX-512, 8 with AVX2).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sysconfig
import threading
import warnings
from pathlib import Path

import torch

from ulite_monai.networks.utils import channels_last_format, update_running_stats

__all__ = ["load_extension", "kernels_enabled", "encoder_tail", "pointwise_gelu", "axial_conv", "decoder_entry",
           "infer_encoder", "infer_decoder", "INFER_ACTS", "inference_input_ok", "MAX_TAIL_CHANNELS",
           "PW_GELU_CHANNELS", "AXIAL_CHANNELS", "AXIAL_BLOCK_CHANNELS"]

_SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
_LOCK = threading.Lock()
_STATE: dict = {}

#: Encoder stages with more input channels than this keep the stock operators: there the 1x1 conv is
#: compute-bound and oneDNN's blocked kernels beat the fused loop.
MAX_TAIL_CHANNELS = 64


def _cpu_tag() -> str:
    """What the build depends on besides its source: ``-march=native`` code runs only on CPUs like this one."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return platform.machine() + flags


def _ninja_on_path() -> None:
    """Put the environment's own ninja (the PyPI package), if it has one, first on PATH for this process, where
    torch.utils.cpp_extension looks for it. Every process of one environment then builds with the same ninja,
    whether or not its PATH is activated: ninja versions write build logs the others cannot read, and a ninja that
    cannot read the log rebuilds (about 50 s)."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = str(ninja.BIN_DIR)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + path


def kernels_enabled() -> bool:
    """Whether the fused CPU kernels may be used: by default on CPUs where PyTorch runs AVX2 or AVX-512 code, where
    they were measured faster than PyTorch's own operators. Elsewhere (ARM, x86 without AVX2) they are unmeasured:
    on x86 with SSE only, a build of them ran the 2D paper training step level with the stock operators (834 against
    801 ms, 2-core AMD EPYC built with ``-mno-avx``), so the stock operators run there unless
    ``ULITE_CPU_KERNELS=1``. ``ULITE_CPU_KERNELS=0`` turns them off everywhere."""
    value = os.environ.get("ULITE_CPU_KERNELS", "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512"))


def load_extension(verbose: bool = False):
    """The compiled extension module, building it on first call; ``None`` (with one warning) if it cannot be
    built or is turned off."""
    if not kernels_enabled():
        return None
    with _LOCK:
        if "module" in _STATE:
            return _STATE["module"]
        module = None
        try:
            from torch.utils.cpp_extension import load

            _ninja_on_path()

            # OpenMP: ATen's parallel_for is inline code that runs serially unless compiled with it (the library
            # resolves to the libgomp already loaded with torch)
            flags = ["-O3", "-fno-math-errno", "-fopenmp"]
            if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
                flags.append("-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native")
            # the build's paths and ninja too: two environments with the same torch version (the project's and the
            # Label server's) would otherwise share one build folder, and each would rebuild it (about 50 s)
            # whenever the other had been there last (its build file names the other environment's headers)
            key = [_SOURCE.read_bytes(), _cpu_tag().encode(), torch.__version__.encode(), " ".join(flags).encode(),
                   os.path.dirname(torch.__file__).encode(), sysconfig.get_paths()["include"].encode(),
                   str(shutil.which("ninja")).encode()]
            tag = hashlib.sha1(b"\0".join(key)).hexdigest()[:12]
            module = load(name=f"ulite_cpu_kernels_{tag}", sources=[str(_SOURCE)], extra_cflags=flags,
                          extra_ldflags=["-fopenmp"], verbose=verbose)
        except Exception as e:  # no compiler, no headers, a failed build: the stock operators still work
            warnings.warn(
                f"ulite_monai: the fused CPU kernels could not be built ({type(e).__name__}: {str(e)[:300]}); "
                "U-Lite trains with PyTorch's stock operators instead (slower on the CPU). Install a C++ compiler "
                "(g++) and ninja to enable them, or set ULITE_CPU_KERNELS=0 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
        _STATE["module"] = module
        return module


class _EncoderTail(torch.autograd.Function):
    """``(maxpool2(pw(bn(y))), bn(y))`` for a channels-last ``y`` viewed as ``[N, D, H, W, C]``; with ``gelu``, the
    GELU of the first. The backward recomputes ``bn(y)`` from ``y`` rather than keeping it."""

    @staticmethod
    def forward(ctx, y, gamma, beta, weight, bias, mean, invstd, batch_stats, pool_d, gelu, ext):  # noqa: D102
        a = (gamma * invstd).contiguous()
        b = (beta - mean * a).contiguous()
        w2 = weight.reshape(weight.shape[0], weight.shape[1])
        s, z, idx, pre = ext.encoder_tail_forward(y, a, b, w2.t().contiguous(), bias.contiguous(), pool_d, gelu)
        ctx.save_for_backward(y, idx, pre, w2.contiguous(), a, b, mean, invstd)
        ctx.flags = (batch_stats, pool_d, ext, weight.shape)
        ctx.mark_non_differentiable(idx)
        return z, s, idx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz, gs, _gidx):  # noqa: D102
        y, idx, pre, w2, a, b, mean, invstd = ctx.saved_tensors
        batch_stats, pool_d, ext, wshape = ctx.flags
        gz = gz.contiguous() if gz is not None else torch.zeros(idx.shape, dtype=y.dtype)
        gs = gs.contiguous() if gs is not None else torch.empty(0, dtype=y.dtype)
        gy, gw, gb, sum_g, sum_gx = ext.encoder_tail_backward(gz, idx, y, pre, gs, w2, a, b, mean, invstd,
                                                              batch_stats, pool_d)
        # (b depends on beta and the statistics, but the gradients through it are the batch norm's, formed above)
        return gy, sum_gx * invstd, sum_g, gw.view(wshape), gb, None, None, None, None, None, None


try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover - a torch without it
    _get_current_dispatch_mode = None


def _dispatch_mode_active() -> bool:
    """Whether a ``TorchDispatchMode`` (``FlopCounterMode``, ``FakeTensorMode``, ...) is watching the operators: the
    kernels' calls are invisible to it, so the stock operators run instead."""
    return _get_current_dispatch_mode is not None and _get_current_dispatch_mode() is not None


def _eager_cpu_float32_channels_last(x: torch.Tensor) -> bool:
    """What every kernel here needs of its input: a float32 CPU tensor in channels-last memory, in eager mode
    (not under autocast, ``torch.compile``, TorchScript, tracing or a dispatch mode such as the FLOP counter)."""
    nd = x.dim() - 2
    return (
        nd in (2, 3)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.is_contiguous(memory_format=channels_last_format(nd))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not _dispatch_mode_active()
    )


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x if type(x) is torch.Tensor else x.as_subclass(torch.Tensor)


def _as5(x: torch.Tensor) -> torch.Tensor:
    """The ``[N, D, H, W, C]`` view of a channels-last 2D or 3D batch's memory (``D == 1`` in 2D)."""
    nd = x.dim() - 2
    cl = _plain(x).permute(0, *range(2, nd + 2), 1)
    return cl if nd == 3 else cl.unsqueeze(1)


def _from5(out: torch.Tensor, nd: int) -> torch.Tensor:
    """A ``[N, D, H, W, C]`` result as an ``N, C, (D,) H, W`` channels-last batch (the same memory)."""
    out = out if nd == 3 else out.squeeze(1)
    return out.permute(0, nd + 1, *range(1, nd + 1))


def _like_input(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` as the subclass of ``x`` (a MONAI MetaTensor keeps its metadata, as stock operators keep it)."""
    if type(x) is torch.Tensor:
        return out
    from monai.data import MetaTensor

    if isinstance(x, MetaTensor):
        result = MetaTensor(out)
        result.copy_meta_from(x)
        return result
    return out.as_subclass(type(x))


def encoder_tail(norm: torch.nn.Module, pw: torch.nn.Module, y: torch.Tensor, act: torch.nn.Module | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(act(maxpool2(pw(norm(y)))), norm(y))`` through the fused kernels (``act`` None: none), with ``norm``'s
    running statistics updated as ``norm(y)`` updates them; an exact ``nn.GELU`` runs inside the kernels, any
    other ``act`` after them. ``None`` where the kernels do not apply (then run the stock operators): not a CPU
    float32 channels-last 2D/3D input, a norm other than an affine ``BatchNorm2d``/``BatchNorm3d``, more than
    :data:`MAX_TAIL_CHANNELS` channels, autocast or ``torch.compile``, or no extension.
    """
    nd = y.dim() - 2
    cls = type(norm)
    if not (
        nd in (2, 3)
        and cls is (torch.nn.BatchNorm2d if nd == 2 else torch.nn.BatchNorm3d)
        and norm.affine
        and pw.weight.dtype == torch.float32
        and pw.bias is not None
        and 1 < y.shape[1] <= MAX_TAIL_CHANNELS
        and all(s % 2 == 0 for s in y.shape[2:])
        and _eager_cpu_float32_channels_last(y)
    ):
        return None
    ext = load_extension()
    if ext is None:
        return None
    c = y.shape[1]
    m = y.numel() // c
    batch_stats = norm.training or norm.running_mean is None or norm.running_var is None
    if batch_stats and m < 2:
        return None  # nn.BatchNorm's own error for a single value per channel
    plain = _plain(y)
    cl = plain.permute(0, *range(2, nd + 2), 1)  # [N, (D,) H, W, C]: the channels-last memory, a view
    y5 = cl if nd == 3 else cl.unsqueeze(1)
    if batch_stats:
        with torch.no_grad():
            mean, var = ext.channel_stats(y5.detach().reshape(m, c))
        update_running_stats(norm, mean, var, m)
    else:
        mean, var = norm.running_mean.detach(), norm.running_var.detach()
    invstd = torch.rsqrt(var + norm.eps)
    gelu = type(act) is torch.nn.GELU and act.approximate == "none"
    z5, s5, _ = _EncoderTail.apply(y5, norm.weight, norm.bias, pw.weight, pw.bias, mean, invstd, batch_stats,
                                   nd == 3, gelu, ext)
    if nd == 2:
        z5, s5 = z5.squeeze(1), s5.squeeze(1)
    z = _like_input(z5.permute(0, nd + 1, *range(1, nd + 1)), y)
    skip = s5.permute(0, nd + 1, *range(1, nd + 1))
    if act is not None and not gelu:
        z = act(z)
    return z, _like_input(skip, y)


class _PointwiseGelu(torch.autograd.Function):
    """``gelu(rows @ weight^T + bias)`` for ``rows`` ``[M, C]`` (a channels-last tensor's memory), or with a head
    (``head_weight`` ``(HO <= 8, C, 1...)``) that GELU's 1x1 conv ``[M, HO]``, the GELU never stored; the backward
    recomputes the pre-activation instead of keeping it."""

    @staticmethod
    def forward(ctx, rows, weight, bias, head_weight, head_bias, ext):  # noqa: D102
        w2 = weight.reshape(weight.shape[0], weight.shape[1]).contiguous()
        hw = hb = torch.empty(0)
        if head_weight is not None:
            hw = head_weight.reshape(head_weight.shape[0], head_weight.shape[1]).contiguous()
            hb = head_bias.contiguous()
        out = ext.pw_gelu_forward(rows, w2, bias.contiguous(), hw, hb)
        ctx.save_for_backward(rows, w2, bias, hw)
        ctx.flags = (ext, weight.shape, None if head_weight is None else head_weight.shape)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: D102
        rows, w2, bias, hw = ctx.saved_tensors
        ext, wshape, hshape = ctx.flags
        gx, gw, gb, ghw, ghb = ext.pw_gelu_backward(g.contiguous(), rows, w2, bias.contiguous(), hw)
        return gx, gw.view(wshape), gb, None if hshape is None else ghw.view(hshape), ghb, None


#: channel counts of the compiled 1x1 conv + GELU kernels (square weights: a decoder's second 1x1 conv)
PW_GELU_CHANNELS = (8, 16, 32, 64)

#: the most output channels of a head that runs inside the 1x1 conv + GELU kernels
MAX_HEAD_CHANNELS = 8


def _kernel_head(head: torch.nn.Module, nd: int, c: int) -> bool:
    """Whether ``head`` is a plain 1x1 conv of ``c`` inputs and at most :data:`MAX_HEAD_CHANNELS` outputs with a
    bias, which the 1x1 conv + GELU kernels can run."""
    return (
        type(head) is (torch.nn.Conv2d if nd == 2 else torch.nn.Conv3d)
        and head.in_channels == c
        and 1 <= head.out_channels <= MAX_HEAD_CHANNELS
        and head.groups == 1
        and head.bias is not None
        and head.weight.dtype == torch.float32
        and all(k == 1 for k in head.kernel_size)
        and all(st == 1 for st in head.stride)
        and (head.padding in ("valid", "same") or all(p == 0 for p in head.padding))
    )


def pointwise_gelu(pw: torch.nn.Module, act: torch.nn.Module, x: torch.Tensor,
                   head: torch.nn.Module | None = None) -> torch.Tensor | None:
    """``act(pw(x))`` for a square 1x1 conv ``pw`` and an exact ``nn.GELU`` ``act`` through one fused kernel
    each way (a decoder's last two operations), or ``head(act(pw(x)))`` with a ``head``: a 1x1 conv of at most
    :data:`MAX_HEAD_CHANNELS` outputs (the network's output conv) runs inside the same kernels, the GELU's output
    never stored; any other head after them. ``None`` where the kernels do not apply (then run the stock operators):
    as :func:`encoder_tail`, for channel counts in :data:`PW_GELU_CHANNELS`."""
    nd = x.dim() - 2
    c = x.shape[1]
    if not (
        nd in (2, 3)
        and type(act) is torch.nn.GELU
        and act.approximate == "none"
        and pw.weight.dtype == torch.float32
        and pw.bias is not None
        and c in PW_GELU_CHANNELS
        and tuple(pw.weight.shape[:2]) == (c, c)
        and all(k == 1 for k in pw.weight.shape[2:])
        and _eager_cpu_float32_channels_last(x)
    ):
        return None
    ext = load_extension()
    if ext is None:
        return None
    plain = _plain(x)
    cl = plain.permute(0, *range(2, nd + 2), 1)  # [N, (D,) H, W, C]: a view of the channels-last memory
    inside = head is not None and _kernel_head(head, nd, c)
    out = _PointwiseGelu.apply(cl.reshape(-1, c), pw.weight, pw.bias, head.weight if inside else None,
                               head.bias if inside else None, ext)
    out = out.view(*cl.shape[:-1], out.shape[-1]).permute(0, nd + 1, *range(1, nd + 1))
    out = _like_input(out, x)
    return head(out) if head is not None and not inside else out


class _AxialConv(torch.autograd.Function):
    """``x + bias + sum_axis dwconv_axis(x)`` for ``x`` ``[N, D, H, W, C]`` and taps ``[A, K, C]``; the input gradient
    is the same block with the taps reversed (odd kernels, "same" zero padding) and no bias."""

    @staticmethod
    def forward(ctx, x5, bias, dilation, ext, shapes, *weights):  # noqa: D102
        c = x5.shape[-1]
        taps = torch.stack([w.reshape(c, -1) for w in weights]).transpose(1, 2).contiguous()  # [A, K, C]
        out = ext.axial_forward(x5, taps, bias.contiguous(), dilation)
        ctx.save_for_backward(x5, taps)
        ctx.flags = (dilation, ext, shapes)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: D102
        x5, taps = ctx.saved_tensors
        dilation, ext, shapes = ctx.flags
        g = g.contiguous()
        need = ctx.needs_input_grad
        gx = None
        if need[0]:
            gx = ext.axial_forward(g, taps.flip(1).contiguous(), torch.zeros(x5.shape[-1], dtype=x5.dtype), dilation)
        gw, gb = ext.axial_weight_grad(g, x5, taps.shape[0], taps.shape[1], dilation)
        grads_w = [gw[a].t().reshape(shape) for a, shape in enumerate(shapes)]
        return (gx, gb, None, None, None, *grads_w)


#: channel counts of the compiled axial-block kernels
AXIAL_CHANNELS = (8, 16, 32, 64)

#: channel counts the training axial block (:func:`axial_conv`) runs through the kernels: the compiled ones, and wider
#: tensors as blocks of 64 channels (the 2D paper widths' deep stages)
AXIAL_BLOCK_CHANNELS = AXIAL_CHANNELS + (128, 256, 512)


def axial_conv(x: torch.Tensor, weights, biases, dilations) -> torch.Tensor | None:
    """U-Lite's axial block ``x + sum_axis dwconv_axis(x)`` (per-axis depthwise weights ``(C, 1, ..., K, ...)``,
    biases, one dilation for all axes) in one pass forward and two backward (input gradient; weight and bias
    gradients), channels-last; ``None`` where it does not apply (then run :func:`~ulite_monai.networks.axial.
    axial_merged`): as :func:`encoder_tail`, for channel counts in :data:`AXIAL_BLOCK_CHANNELS`."""
    nd = x.dim() - 2
    if nd not in (2, 3) or len(weights) != nd:
        return None
    c = x.shape[1]
    k = weights[0].shape[2]
    if not (
        c in AXIAL_BLOCK_CHANNELS
        and len(set(int(d) for d in dilations)) == 1
        and k % 2 == 1
        and k <= 15
        and all(w.dtype == torch.float32 and w.shape[0] == c and w.numel() == c * k for w in weights)
        and all(b is None or b.dtype == torch.float32 for b in biases)
        and _eager_cpu_float32_channels_last(x)
    ):
        return None
    ext = load_extension()
    if ext is None:
        return None
    bias = torch.zeros(c, dtype=x.dtype)
    for b in biases:
        if b is not None:
            bias = bias + b
    out = _AxialConv.apply(_as5(x), bias, int(dilations[0]), ext, tuple(w.shape for w in weights), *weights)
    return _like_input(_from5(out, nd), x)


class _DecoderEntry(torch.autograd.Function):
    """``batch_norm(skip @ w^T + up2(lo))`` for ``skip`` ``[N, D, H, W, C]`` and the projected coarse ``lo``; returns
    the normalised output and the statistics it used (the caller updates the running statistics with them)."""

    @staticmethod
    def forward(ctx, lo5, skip5, weight, gamma, beta, mean, var, eps, batch_stats, ext):  # noqa: D102
        c = skip5.shape[-1]
        w2 = weight.reshape(c, c).contiguous()
        y, bmean, bvar = ext.decoder_entry_forward(skip5, lo5, w2.t().contiguous(), batch_stats)
        if batch_stats:
            mean, var = bmean, bvar
        invstd = torch.rsqrt(var + eps)
        a = gamma.detach() * invstd
        out = torch.addcmul(beta.detach() - mean * a, y, a)
        ctx.save_for_backward(y, skip5, w2, a, mean, invstd)
        ctx.flags = (batch_stats, ext, weight.shape, lo5.shape[1])
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _gmean, _gvar):  # noqa: D102
        y, skip5, w2, a, mean, invstd = ctx.saved_tensors
        batch_stats, ext, wshape, lo_d = ctx.flags
        g = g.contiguous()
        c = y.shape[-1]
        sum_g, sum_gx = ext.channel_grad_sums(g.view(-1, c), y.view(-1, c), mean)
        if batch_stats:
            m = y.numel() // c
            coef = -a * invstd * invstd * sum_gx / m
            shift = -a * sum_g / m - mean * coef
        else:
            coef = torch.zeros_like(a)
            shift = torch.zeros_like(a)
        gskip, glo, gw = ext.decoder_entry_backward(g, y, skip5, w2, a.contiguous(), coef.contiguous(),
                                                    shift.contiguous(), lo_d)
        return glo, gskip, gw.view(wshape), sum_gx * invstd, sum_g, None, None, None, None, None


def decoder_entry(norm: torch.nn.Module, lo: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor
                  ) -> torch.Tensor | None:
    """A decoder's ``norm(up2(lo) + pw_b(skip))`` through the fused kernels (``lo`` the coarse input already through
    its half of the decoder's 1x1 conv, bias included; ``weight`` ``(C, C, 1...)`` the skip's half), with ``norm``'s
    running statistics updated as ``norm(...)`` updates them; one pass forward (the sum, its statistics) plus the
    normalisation, and one pass backward plus a read-only one for the batch norm's sums. ``None`` where it does not
    apply (then run the stock operators): as :func:`encoder_tail`, for channel counts in :data:`AXIAL_CHANNELS`,
    ``lo`` channels-last with half ``skip``'s spatial sizes."""
    nd = skip.dim() - 2
    c = skip.shape[1]
    if not (
        nd in (2, 3)
        and type(norm) is (torch.nn.BatchNorm2d if nd == 2 else torch.nn.BatchNorm3d)
        and norm.affine
        and c in AXIAL_CHANNELS
        and weight.dtype == torch.float32
        and tuple(weight.shape[:2]) == (c, c)
        and all(k == 1 for k in weight.shape[2:])
        and lo.dim() == skip.dim()
        and lo.shape[:2] == skip.shape[:2]
        and all(2 * a == b for a, b in zip(lo.shape[2:], skip.shape[2:]))
        and _eager_cpu_float32_channels_last(skip)
        and _eager_cpu_float32_channels_last(lo)
    ):
        return None
    ext = load_extension()
    if ext is None:
        return None
    m = skip.numel() // c
    batch_stats = norm.training or norm.running_mean is None or norm.running_var is None
    if batch_stats and m < 2:
        return None  # nn.BatchNorm's own error for a single value per channel
    if batch_stats:
        mean = var = torch.empty(0)
    else:
        mean, var = norm.running_mean.detach(), norm.running_var.detach()
    out5, mean, var = _DecoderEntry.apply(_as5(lo), _as5(skip), weight, norm.weight, norm.bias, mean, var,
                                          float(norm.eps), batch_stats, ext)
    if batch_stats:
        update_running_stats(norm, mean, var, m)
    return _like_input(_from5(out5, nd), skip)


# ------------------------------------------------------------------------------------------ inference stages

#: activations of the fused inference stages, as the kernels number them
INFER_ACTS = {"none": 0, "gelu": 1, "relu": 2}


def inference_input_ok(x: torch.Tensor) -> bool:
    """What the inference stages need: :func:`_eager_cpu_float32_channels_last`, compiled channels, even sizes, and
    no gradient asked for (they have no backward)."""
    return (
        x.shape[1] in AXIAL_CHANNELS
        and all(s % 2 == 0 for s in x.shape[2:])
        and not (x.requires_grad and torch.is_grad_enabled())
        and _eager_cpu_float32_channels_last(x)
    )


def infer_encoder(x: torch.Tensor, taps: torch.Tensor, tap_bias: torch.Tensor, dilation: int, wt: torch.Tensor,
                  bias: torch.Tensor, act: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A fused inference encoder stage in one pass: ``y = axial(x) @ wt + bias`` (``taps`` ``[A, K, C]`` and
    ``tap_bias`` with the batch norm folded in, ``wt`` ``[C, 3C]``), returning
    ``(act(maxpool2(y[:, :2C])), y[:, 2C:])`` as channels-last batches; only the pooled output and the projected skip
    are written to memory. ``None`` where the kernel does not apply (then run the stock operators): input as for
    :func:`axial_conv`, no gradient, even sizes."""
    nd = x.dim() - 2
    if not (inference_input_ok(x) and taps.shape[0] == nd and wt.shape == (x.shape[1], 3 * x.shape[1])):
        return None
    ext = load_extension()
    if ext is None:
        return None
    pooled, skip = ext.infer_encoder(_as5(x), taps, tap_bias, int(dilation), wt, bias, int(act))
    return _like_input(_from5(pooled, nd), x), _like_input(_from5(skip, nd), x)


def infer_decoder(skip: torch.Tensor, lo: torch.Tensor, taps: torch.Tensor, tap_bias: torch.Tensor, dilation: int,
                  w2t: torch.Tensor, b2: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor, int] | None = None
                  ) -> torch.Tensor | None:
    """A fused inference decoder stage in one pass: ``gelu(axial(skip + up2(lo)) @ w2t + b2)``, with ``skip`` and the
    coarse ``lo`` already projected (``C`` channels each), the up-sampling and the addition done on the fly.
    ``head = (hwt [C, HP], hb [HP], n)`` also applies the network's output 1x1 conv (``n`` output channels, ``HP``
    zero-padded to a multiple of 8, at most 32). Returns a channels-last batch, or ``None`` where the kernel does
    not apply."""
    nd = skip.dim() - 2
    if not (
        inference_input_ok(skip)
        and taps.shape[0] == nd
        and lo.shape[:2] == skip.shape[:2]
        and all(2 * a == b for a, b in zip(lo.shape[2:], skip.shape[2:]))
        and _eager_cpu_float32_channels_last(lo)
        and not (lo.requires_grad and torch.is_grad_enabled())
    ):
        return None
    ext = load_extension()
    if ext is None:
        return None
    hwt, hb, n = head if head is not None else (None, None, 0)
    out = ext.infer_decoder(_as5(skip), _as5(lo), taps, tap_bias, int(dilation), w2t, b2, hwt, hb, int(n))
    return _like_input(_from5(out, nd), skip)
