# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The embedded demo datasets: deterministic, non-trivial geometry and content, datalists."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from ulite_monai.data import list_inputs, load_datalist
from ulite_monai.data.demo import ensure_demo_dataset, generate_demo_dataset, make_demo_case
from ulite_monai.data.isic import generate_isic_demo, isic_pairs, isic_split


def test_demo_case_is_deterministic():
    a_img, a_lab, a_aff = make_demo_case(7)
    b_img, b_lab, b_aff = make_demo_case(7)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    np.testing.assert_array_equal(a_aff, b_aff)
    c_img, _, c_aff = make_demo_case(8)
    assert a_img.shape != c_img.shape or not np.array_equal(a_img, c_img)
    assert not np.allclose(a_aff, c_aff)


def test_demo_cases_are_not_trivial():
    shapes, spacings, fractions = set(), [], []
    for seed in range(6):
        img, lab, aff = make_demo_case(seed)
        shapes.add(img.shape)
        spacing = np.linalg.norm(aff[:3, :3], axis=0)
        spacings.append(spacing)
        assert 1.4 < spacing.min() and spacing.max() < 2.6  # realistic, anisotropic mm
        rot = aff[:3, :3] / spacing
        assert not np.allclose(np.abs(rot), np.eye(3), atol=1e-3)  # oblique direction
        assert img.dtype == np.int16 and img.min() <= -1000 and 100 < img.max() < 1000  # HU-like
        assert set(np.unique(lab)) == {0, 1}
        fractions.append(lab.mean())
        fg, bg = img[lab > 0], img[(lab == 0) & (img > -500)]
        # foreground is brighter on average, but the intensity ranges overlap (noise, distractors, bias)
        assert fg.mean() > bg.mean() + 30
        assert (bg > np.percentile(fg, 10)).sum() > 100  # a threshold alone cannot separate them
    assert len(shapes) == 6
    assert max(fractions) > 2 * min(fractions)  # varied target sizes


def test_generate_and_load_datalist(tmp_path):
    dl = generate_demo_dataset(tmp_path, num_train=2, num_val=1, num_test=1)
    data = json.loads(dl.read_text())
    assert len(data["training"]) == 2 and len(data["validation"]) == 1 and len(data["testing"]) == 1
    train = load_datalist(tmp_path, "training")
    assert all(p.startswith(str(tmp_path)) for it in train for p in it.values())
    nii = nib.load(train[0]["image"])
    lab = nib.load(train[0]["label"])
    np.testing.assert_allclose(nii.affine, lab.affine)
    assert nii.header.get_sform(coded=True)[1] == 1
    img0, _, aff0 = make_demo_case(data["seed"])
    np.testing.assert_array_equal(np.asarray(nii.dataobj), img0)  # files hold exactly the generated case
    np.testing.assert_allclose(nii.affine, aff0, atol=1e-5)
    assert list_inputs(tmp_path / "imagesTs") == [{"image": str(tmp_path / "imagesTs" / "test_000.nii.gz")}]


def test_ensure_demo_generates_once_and_refuses_foreign_folders(tmp_path, monkeypatch):
    calls = []
    import ulite_monai.data.demo as demo

    real = demo.generate_demo_dataset
    monkeypatch.setattr(demo, "generate_demo_dataset", lambda root, **kw: calls.append(root) or real(root, 1, 1, 0))
    ensure_demo_dataset(tmp_path / "d")
    ensure_demo_dataset(tmp_path / "d")
    assert len(calls) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "something.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="other"):
        ensure_demo_dataset(other)


def test_isic_folder_helpers(tmp_path):
    pairs = generate_isic_demo(tmp_path / "isic", num_cases=5, size=(32, 40))
    assert len(pairs) == 5 and all(p["label"].endswith("_segmentation.png") for p in pairs)
    again = generate_isic_demo(tmp_path / "isic2", num_cases=5, size=(32, 40))
    assert [open(a["image"], "rb").read() for a in pairs] == [open(b["image"], "rb").read() for b in again]
    split = isic_split(pairs, val_fraction=0.2)
    assert len(split["validation"]) == 1 and len(split["training"]) == 4
    assert load_datalist(tmp_path / "isic", "validation") == split["validation"]
    # an image without its mask is reported by name
    (tmp_path / "isic" / "lonely.jpg").write_bytes(open(pairs[0]["image"], "rb").read())
    with pytest.raises(FileNotFoundError, match="lonely.jpg"):
        isic_pairs(tmp_path / "isic")


def test_list_inputs_file_folder_dicom(tmp_path):
    from support.bundle import blob_volume, sitk_image, write_dicom_series

    series = write_dicom_series(sitk_image(blob_volume(shape=(3, 6, 6))), tmp_path / "study" / "s1")
    write_dicom_series(sitk_image(blob_volume(shape=(3, 6, 6))), tmp_path / "study" / "s2")
    assert list_inputs(series) == [{"image": str(series)}]
    assert [i["image"] for i in list_inputs(tmp_path / "study")] == [str(series), str(tmp_path / "study" / "s2")]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_inputs(tmp_path / "nowhere")
