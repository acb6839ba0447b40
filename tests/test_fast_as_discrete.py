"""``FastAsDiscreted``: MONAI's AsDiscreted with the argmax as ``torch.max(...).indices``; the outputs must be MONAI's
exactly (values, ties, NaN, dtype, metadata), and the bundles must use it for every discretisation step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import AsDiscrete, AsDiscreted

from ulite_monai.data.transforms import FastAsDiscrete, FastAsDiscreted

REPO = Path(__file__).resolve().parents[1]


def _probabilities(c: int = 3) -> MetaTensor:
    torch.manual_seed(0)
    x = torch.rand(c, 24, 20, 12)
    x[:, 0, 0, 0] = 0.5  # a tie: the first channel wins
    x[1:, 1, 0, 0] = 0.9  # a tie between later channels
    x[c - 1, 2, 0, 0] = float("nan")  # NaN counts as the maximum
    return MetaTensor(x, affine=torch.diag(torch.tensor([0.7, 0.8, 5.0, 1.0])), meta={"filename_or_obj": "ct.nii"})


@pytest.mark.parametrize("kwargs", [
    {"argmax": True},
    {"argmax": True, "to_onehot": 3},
    {"argmax": True, "keepdim": False},
    {"argmax": True, "dim": 1},
    {"threshold": 0.5},
    {"argmax": False, "rounding": "torchrounding"},
])
def test_same_output_as_monai(kwargs):
    x = _probabilities()
    want = AsDiscreted("pred", **kwargs)({"pred": x})["pred"]
    got = FastAsDiscreted("pred", **kwargs)({"pred": x})["pred"]
    assert type(got) is type(want) and got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.as_tensor(), want.as_tensor(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got.affine, want.affine) and got.meta["filename_or_obj"] == "ct.nii"
    if kwargs.get("argmax") and "dim" not in kwargs and "to_onehot" not in kwargs:
        lab = got.as_tensor().reshape(-1, *x.shape[1:])[0] if kwargs.get("keepdim", True) else got.as_tensor()
        assert lab[0, 0, 0] == 0 and lab[1, 0, 0] == 1 and lab[2, 0, 0] == 2  # ties and NaN as torch.argmax


def test_plain_tensors_and_arrays_as_monai():
    x = _probabilities(2).as_tensor()
    for value in (x, x.numpy()):
        want, got = AsDiscrete(argmax=True)(value), FastAsDiscrete(argmax=True)(value)
        assert type(got) is type(want) and got.dtype == want.dtype
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_every_bundle_discretises_with_it():
    """No config of either bundle keeps MONAI's AsDiscreted (with its slow CPU argmax)."""
    seen = 0
    for cfg in sorted((REPO / "bundles").glob("*/configs/*.json")):
        text = cfg.read_text()
        assert '"AsDiscreted"' not in text and "monai.transforms.AsDiscreted" not in text, cfg
        seen += text.count("ulite_monai.data.transforms.FastAsDiscreted")
        json.loads(text)
    assert seen >= 9
