"""``SeparableSpacingd``: MONAI's ``Spacingd`` whose inverse (what ``Invertd`` runs to put a prediction back on its
image's grid) resamples one axis at a time. Against MONAI's own inverse: the same values, shape, affine and
metadata through the bundle's chain (orientation, spacing, foreground crop) in 2D and 3D, axis-aligned and oblique
images, flips, both padding modes; the cases it leaves to MONAI; the bundle configs that use it; and MONAI 1.5 (the
MONAI Label environment)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, CropForegroundd, Invertd, Orientationd, Spacingd

import ulite_monai.data.transforms as T
from ulite_monai.bundle import Bundle
from ulite_monai.data.transforms import SeparableSpacingd, separable_resample
from support.label import ci_requires, label_env_problem, run_label_python


def _affine(dims: int, rotation: float, spacing, flips) -> torch.Tensor:
    """An image affine with direction cosines rotated about the last axis (oblique), per-axis spacing and flips."""
    c, s = np.cos(rotation), np.sin(rotation)
    rot = np.eye(dims)
    rot[:2, :2] = [[c, -s], [s, c]]
    a = np.eye(dims + 1)
    a[:dims, :dims] = rot @ np.diag(np.asarray(spacing[:dims]) * np.asarray(flips[:dims]))
    a[:dims, dims] = [-12.5, 20.25, 5.0][:dims]
    return torch.tensor(a)


def _chain(spacing_cls, dims: int, **kw) -> Compose:
    pixdim = (2.0, 2.1, 3.0)[:dims]
    return Compose([
        Orientationd("image", "RAS" if dims == 3 else "RA"),
        spacing_cls("image", pixdim=pixdim, mode="bilinear", **kw),
        CropForegroundd("image", "image", margin=2, allow_smaller=True),
    ])


def _invert(spacing_cls, img: MetaTensor, dims: int, nearest: bool = False, **kw) -> MetaTensor:
    chain = _chain(spacing_cls, dims, **kw)
    out = chain({"image": img.clone()})
    pred = out["image"].clone() * 2.0 - 0.5  # a "prediction" with the image's trace, as the bundle's network gives
    invert = Invertd("pred", chain, orig_keys="image", nearest_interp=nearest)
    return invert({"pred": pred, "image": out["image"]})["pred"]


@pytest.fixture
def fast_calls(monkeypatch):
    """How many times the separable path ran."""
    calls = []
    real = T.separable_resample
    monkeypatch.setattr(T, "separable_resample", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


@pytest.mark.parametrize("dims,shape,rotation,spacing,flips,kw", [
    (3, (2, 40, 34, 12), 0.0, (0.7, 0.8, 2.5), (1, 1, 1), {}),  # a CT-like grid, axis-aligned
    (3, (1, 30, 26, 18), 0.3, (0.9, 0.9, 1.2), (1, -1, 1), {}),  # oblique with a flip (Spacing keeps both)
    (3, (2, 25, 31, 9), 0.0, (1.1, 0.6, 4.0), (-1, 1, -1), {"padding_mode": "zeros"}),
    # scale_extent: the grids' first voxels no longer coincide (a shift as well as a scale per axis)
    (3, (1, 16, 20, 22), 0.2, (3.0, 2.5, 1.0), (1, 1, 1), {"scale_extent": True}),  # shrinking and growing axes
    (3, (1, 21, 17, 13), 0.0, (0.8, 1.4, 2.0), (1, 1, -1), {"scale_extent": True, "padding_mode": "zeros"}),
    (2, (3, 50, 41), 0.0, (0.5, 0.75), (1, 1), {}),
    (2, (1, 33, 28), 0.4, (1.3, 0.8), (-1, 1), {"padding_mode": "zeros", "scale_extent": True}),
])
def test_the_inverse_equals_monais(dims, shape, rotation, spacing, flips, kw, fast_calls):
    torch.manual_seed(0)
    img = MetaTensor(torch.rand(shape) + 0.1, affine=_affine(dims, rotation, spacing, flips),
                     meta={"filename_or_obj": "case.nii.gz"})
    ours = _invert(SeparableSpacingd, img, dims, **kw)
    assert len(fast_calls) == 1  # the separable path ran (not MONAI's inverse twice)
    theirs = _invert(Spacingd, img, dims, **kw)
    assert isinstance(ours, MetaTensor) and ours.dtype == theirs.dtype == torch.float32
    assert ours.shape == theirs.shape == img.shape
    assert (ours - theirs).abs().max().item() < 1e-5
    assert torch.allclose(ours.affine, theirs.affine, atol=1e-9)
    assert torch.allclose(ours.affine, img.affine.to(ours.affine.dtype), atol=1e-6)
    assert len(ours.applied_operations) == len(theirs.applied_operations) == 0
    assert ours.pending_operations == theirs.pending_operations == []
    assert set(ours.meta) == set(theirs.meta)
    for key in ("filename_or_obj", "spatial_shape", "pixdim", "space"):
        if key in theirs.meta:
            assert str(ours.meta[key]) == str(theirs.meta[key]), key


def test_separable_resample_is_grid_sample_for_axis_aligned_maps():
    """The building block against torch's grid_sample on the same voxel map (scale, shift, flip), both paddings:
    taps outside the image clamp (border) or weigh nothing (zeros)."""
    torch.manual_seed(1)
    img = torch.rand(2, 9, 11, 7, dtype=torch.float64)
    scale, offset, size = np.array([0.45, -0.7, 1.6]), np.array([-1.3, 8.2, 0.4]), (21, 14, 6)
    for padding in ("border", "zeros"):
        ours = separable_resample(img, scale, offset, size, padding)
        # grid_sample's grid: normalised (x, y, z) = reversed axes, align_corners=True so that -1 / 1 are the centres
        axes = [torch.arange(n, dtype=torch.float64) * s + o for n, s, o in zip(size, scale, offset)]
        mesh = torch.meshgrid(*axes, indexing="ij")
        norm = [2 * m / (n - 1) - 1 for m, n in zip(mesh, img.shape[1:])]
        grid = torch.stack(norm[::-1], dim=-1)[None]
        ref = torch.nn.functional.grid_sample(img[None], grid, mode="bilinear", padding_mode=padding,
                                              align_corners=True)[0]
        assert (ours - ref).abs().max().item() < 1e-12, padding


@pytest.mark.parametrize("case", ["rotation", "nearest", "align_corners"])
def test_other_resamplings_get_monais_inverse(case, fast_calls):
    """Where the grids are not axis-aligned (Spacingd(diagonal=True) on an oblique image), labels are inverted with
    nearest neighbours, or align_corners=True: MONAI's inverse runs, with MONAI's result exactly."""
    torch.manual_seed(2)
    img = MetaTensor(torch.rand(1, 24, 20, 10), affine=_affine(3, 0.35, (0.9, 0.8, 2.0), (1, 1, 1)))
    kw = {"diagonal": True} if case == "rotation" else {"align_corners": True} if case == "align_corners" else {}
    ours = _invert(SeparableSpacingd, img, 3, nearest=case == "nearest", **kw)
    theirs = _invert(Spacingd, img, 3, nearest=case == "nearest", **kw)
    assert fast_calls == []
    assert torch.equal(ours, theirs)
    assert torch.equal(ours.affine, theirs.affine)


def test_the_3d_bundle_resamples_through_it():
    """inference.json (the batch, the Label app, every door) and train.json (validation, evaluation) put the
    prediction back through this inverse; the forward is MONAI's Spacingd itself."""
    for config in ("inference", "train"):
        parser = Bundle("bundles/ulite").parser(config)
        chain = parser.get_parsed_content("preprocessing" if config == "inference" else "validate#preprocessing")
        kinds = [type(t) for t in chain.transforms]
        assert SeparableSpacingd in kinds, config
        assert issubclass(SeparableSpacingd, Spacingd)
    raw = json.loads(open("bundles/ulite/configs/inference.json").read())
    assert '"Spacingd"' not in json.dumps(raw)


LABEL_SNIPPET = r"""
import json, torch, numpy as np
import monai
from monai.data import MetaTensor
from monai.transforms import Compose, CropForegroundd, Invertd, Orientationd, Spacingd
import ulite_monai.data.transforms as T
calls = []
real = T.separable_resample
T.separable_resample = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
torch.manual_seed(0)
a = np.eye(4); c, s = np.cos(0.3), np.sin(0.3)
a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.8, -0.9, 2.5]); a[:3, 3] = [-12.5, 20.25, 5.0]
img = MetaTensor(torch.rand(2, 30, 26, 12) + 0.1, affine=torch.tensor(a))
outs = []
for cls in (T.SeparableSpacingd, Spacingd):
    chain = Compose([Orientationd("image", "RAS"), cls("image", pixdim=(2.0, 2.1, 3.0), mode="bilinear"),
                     CropForegroundd("image", "image", margin=2, allow_smaller=True)])
    out = chain({"image": img.clone()})
    pred = out["image"].clone()
    invert = Invertd("pred", chain, orig_keys="image", nearest_interp=False)
    outs.append(invert({"pred": pred, "image": out["image"]})["pred"])
print(json.dumps({"monai": monai.__version__, "calls": len(calls), "shape_equal": outs[0].shape == outs[1].shape,
                  "max_diff": float((outs[0] - outs[1]).abs().max()),
                  "affine_diff": float((outs[0].affine - outs[1].affine).abs().max())}))
"""


def test_the_label_environments_monai_gives_the_same_inverse():
    """The MONAI Label server runs the bundle under its own MONAI (1.5): the separable inverse must agree with
    that MONAI's inverse too."""
    ci_requires(label_env_problem())
    out = json.loads(run_label_python(LABEL_SNIPPET).strip().splitlines()[-1])
    assert out["calls"] == 1 and out["shape_equal"], out
    assert out["max_diff"] < 1e-5 and out["affine_diff"] < 1e-9, out
