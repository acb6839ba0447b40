"""The Triton axial kernels (``ULite(axial_impl="triton")``): the reference's outputs and gradients.

On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, which must be set before Triton
is imported, so those checks run in a child process); on CUDA (marked ``cuda``) they run compiled, in fp32 and
under fp16/bf16 autocast. Triton is a test dependency on Linux x86-64 (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

TRITON_PLATFORM = sys.platform == "linux" and platform.machine() == "x86_64"
needs_triton_platform = pytest.mark.skipif(not TRITON_PLATFORM, reason="Triton wheels are for Linux x86-64")
HAS_CUDA = torch.cuda.is_available()
CUDA_ONLY = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

_INTERPRETED = r"""
import json, os
assert os.environ["TRITON_INTERPRET"] == "1"
import torch
from ulite_monai.networks import ULite
from ulite_monai.networks.ulite import AxialDWConv
from ulite_monai.networks.triton_axial import axial_triton

torch.manual_seed(0)
report = {"blocks": [], "nets": []}
# (dims, shape, kernel, dilation): 7-tap blocks, the bottleneck's 3-tap dilated ones, more channels than a block
cases = [(3, (2, 5, 6, 7, 9), 7, 1), (2, (2, 3, 11, 10), 7, 1), (3, (1, 4, 5, 6, 7), 3, 2), (2, (2, 70, 5, 6), 3, 3),
         (3, (1, 3, 4, 3, 5), 7, 1)]  # a block shorter than its taps on every axis
for dims, shape, k, dil in cases:
    m = AxialDWConv(dims, shape[1], k, dilation=dil, impl="reference").double()
    for c in m.convs:
        torch.nn.init.normal_(c.bias)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = [c.weight for c in m.convs] + [c.bias for c in m.convs]
    ref = m.reference_forward(x)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [x] + params, g)
    xf = x.detach().float().requires_grad_()
    pf = [p.detach().float().requires_grad_() for p in params]
    out = axial_triton(xf, pf[:dims], pf[dims:], [dil] * dims)
    got = torch.autograd.grad(out, [xf] + pf, g.float())
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()
    report["blocks"].append({"case": [dims, list(shape), k, dil], "out": rel(out, ref),
                             "grads": [rel(a, b) for a, b in zip(got, want)],
                             "channels_last": out.is_contiguous(memory_format=torch.channels_last if dims == 2
                                                                else torch.channels_last_3d)})
# whole networks: the same outputs and parameter gradients as the reference computation
for dims, shape in ((2, (2, 3, 20, 24)), (3, (1, 1, 12, 16, 8))):
    torch.manual_seed(1)
    ref = ULite(dims, shape[1], 2, features=(4, 8, 16), axial_impl="reference").train()
    for mod in ref.modules():
        if isinstance(mod, torch.nn.BatchNorm2d) or isinstance(mod, torch.nn.BatchNorm3d):
            torch.nn.init.uniform_(mod.weight, 0.5, 1.5)
            torch.nn.init.normal_(mod.bias, std=0.1)
    net = ULite(dims, shape[1], 2, features=(4, 8, 16), axial_impl="triton").train()
    net.load_state_dict(ref.state_dict())
    x = torch.randn(shape)
    y_ref = ref(x)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y = net(x)
    y.backward(g)
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    worst = max((a.grad - b.grad).abs().max().item() for a, b in zip(net.parameters(), ref.parameters()))
    report["nets"].append({"dims": dims, "out": ((y - y_ref).abs().max() / y_ref.abs().max()).item(),
                           "grad": worst / scale})
print(json.dumps(report))
"""


def _child(code: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


@needs_triton_platform
def test_kernels_match_the_reference_under_the_interpreter():
    out = _child(_INTERPRETED, interpret=True)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["blocks"]) == 5 and len(report["nets"]) == 2
    for block in report["blocks"]:
        assert block["out"] < 1e-5, block
        assert max(block["grads"]) < 1e-4, block  # float32 kernels against float64 autograd
        assert block["channels_last"], block
    for net in report["nets"]:
        assert net["out"] < 1e-4, net
        assert net["grad"] < 1e-3, net


@needs_triton_platform
def test_cpu_without_the_interpreter_is_refused_with_a_reason():
    code = ("import torch\nfrom ulite_monai.networks import ULite\n"
            "net = ULite(2, 1, 1, features=(4, 8), axial_impl='triton')\n"
            "try:\n    net(torch.randn(1, 1, 8, 8))\nexcept RuntimeError as e:\n    print('REFUSED', e)\n")
    out = _child(code, interpret=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED" in out.stdout
    assert "CUDA" in out.stdout and "TRITON_INTERPRET=1" in out.stdout and "axial_impl='auto'" in out.stdout


def test_mixed_dilations_are_refused():
    from ulite_monai.networks.triton_axial import axial_triton

    with pytest.raises(ValueError, match="one dilation"):
        axial_triton(torch.zeros(1, 2, 4, 4), [torch.zeros(2, 1, 3, 1), torch.zeros(2, 1, 1, 3)], [None, None], [1, 2])
    with pytest.raises(ValueError, match="2D or 3D"):
        axial_triton(torch.zeros(1, 2, 4), [torch.zeros(2, 1, 3)], [None], [1])


# ---------------------------------------------------------------- CUDA (compiled kernels)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("amp", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("_cuda", [pytest.param(True, marks=CUDA_ONLY)])
def test_triton_training_on_cuda_matches_reference(dims, amp, _cuda):
    from ulite_monai.networks import ULite

    torch.manual_seed(0)
    feats = (8, 16, 32, 64)
    shape = (2, 3, 64, 72) if dims == 2 else (2, 1, 32, 24, 40)
    ref = ULite(dims, shape[1], 2, features=feats, axial_impl="reference").cuda().train()
    net = ULite(dims, shape[1], 2, features=feats, axial_impl="triton").cuda().train()
    net.load_state_dict(ref.state_dict())
    x = torch.randn(shape, device="cuda")
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        outs = []
        for m in (ref, net):
            with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
                y = m(x)
            y.float().square().mean().backward()
            outs.append(y.float())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm
    rel = ((outs[1] - outs[0]).abs().max() / outs[0].abs().max()).item()
    assert rel <= (1e-4 if amp is None else 0.05), rel
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    worst = max((a.grad - b.grad).abs().max().item() for a, b in zip(net.parameters(), ref.parameters()))
    assert worst <= (1e-3 if amp is None else 0.1) * scale, worst / scale
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())
