# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The Triton kernels of :mod:`ulite_monai.networks.triton_axial` (imported only when that path runs: Triton
decides between compiling and interpreting, ``TRITON_INTERPRET=1``, when the kernels are defined)."""

import triton
import triton.language as tl


@triton.jit
def _tile(pid_p, pid_c, P, C, D, H, W, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """A program's positions ``p`` (int64) and channels ``c``, their masks, and the (d, h, w) of each position."""
    p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    w = p % W
    h = (p // W) % H
    d = (p // (W * H)) % D
    return p, c, p < P, c < C, d, h, w


@triton.jit
def _shifted(x_ptr, p, c, pm, cm, C, d, h, w, D, H, W, s, a: tl.constexpr, NAX: tl.constexpr):
    """The tile of channels-last ``x`` shifted by ``s`` voxels along axis ``a`` (of the last ``NAX`` of D, H, W),
    zero outside the volume, as float32."""
    if a == NAX - 1:
        q = w + s
        ok = (q >= 0) & (q < W)
        step = 1
    elif a == NAX - 2:
        q = h + s
        ok = (q >= 0) & (q < H)
        step = W
    else:
        q = d + s
        ok = (q >= 0) & (q < D)
        step = H * W
    mask = (pm & ok)[:, None] & cm[None, :]
    return tl.load(x_ptr + (p + s * step)[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def axial_fwd(x_ptr, w_ptr, b_ptr, out_ptr, P, C, D, H, W, dil,
              K: tl.constexpr, NAX: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # x, out: channels-last (P positions x C channels, channels innermost); w: (NAX, K, C) float32
    p, c, pm, cm, d, h, w = _tile(tl.program_id(0), tl.program_id(1), P, C, D, H, W, BLOCK_P, BLOCK_C)
    m = pm[:, None] & cm[None, :]
    acc = tl.load(x_ptr + p[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cm, other=0.0)[None, :]
    r: tl.constexpr = (K - 1) // 2
    for a in tl.static_range(NAX):
        for j in tl.static_range(K):
            xv = _shifted(x_ptr, p, c, pm, cm, C, d, h, w, D, H, W, (j - r) * dil, a, NAX)
            wv = tl.load(w_ptr + (a * K + j) * C + c, mask=cm, other=0.0)
            acc += xv * wv[None, :]
    tl.store(out_ptr + p[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def axial_wgrad(g_ptr, x_ptr, part_ptr, P, C, D, H, W, dil,
                K: tl.constexpr, NAX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # part: (num_p_blocks, NAX * K + 1, C) float32 partial sums: sum_p g[p] * x[p + shift], then sum_p g[p]
    pid_p = tl.program_id(0)
    p, c, pm, cm, d, h, w = _tile(pid_p, tl.program_id(1), P, C, D, H, W, BLOCK_P, BLOCK_C)
    g = tl.load(g_ptr + p[:, None] * C + c[None, :], mask=pm[:, None] & cm[None, :], other=0.0).to(tl.float32)
    rows = NAX * K + 1
    base = part_ptr + pid_p.to(tl.int64) * rows * C
    r: tl.constexpr = (K - 1) // 2
    for a in tl.static_range(NAX):
        for j in tl.static_range(K):
            xv = _shifted(x_ptr, p, c, pm, cm, C, d, h, w, D, H, W, (j - r) * dil, a, NAX)
            tl.store(base + (a * K + j) * C + c, tl.sum(g * xv, axis=0), mask=cm)
    tl.store(base + (rows - 1) * C + c, tl.sum(g, axis=0), mask=cm)
