"""The Label app's infer task in-process (Label environment, no server): 2D by config, clear weight errors."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from support.label import (
    REPO,
    ci_requires,
    label_env_problem,
    run_label_python,
)

pytestmark = [pytest.mark.label, pytest.mark.slow, pytest.mark.timeout(600)]

BUNDLE = REPO / "bundles" / "ulite"

SNIPPET = r"""
import json, os, sys, torch
from monailabel.interfaces.exception import MONAILabelException
from ulite_monai.bundle import Bundle
from ulite_monai.label.lib.infers import ULiteInfer

bundle, override2d, image2d, image3d, models = sys.argv[1:6]
out = {}

# 2D by config: the same bundle with spatial_dims 2 serves 2D images
b2 = Bundle(bundle, override2d)
os.makedirs(f"{models}/2d", exist_ok=True)
torch.manual_seed(0)
torch.save(b2.parser("inference").get_parsed_content("network_def").state_dict(), f"{models}/2d/ulite.pt")
task = ULiteInfer(b2, f"{models}/2d")
label, result = task({"image": image2d, "device": "cpu"})
out["dimension_2d"] = task.info()["dimension"]
out["label_2d"] = label

def error_of(task, image):
    try:
        task({"image": image, "device": "cpu"})
    except MONAILabelException as e:
        return e.msg
    return None

# no checkpoint anywhere: a clear error, not random weights
b3 = Bundle(bundle)
out["no_checkpoint"] = error_of(ULiteInfer(b3, f"{models}/empty"), image3d)
# a checkpoint of another network: says so
os.makedirs(f"{models}/other", exist_ok=True)
torch.save(b2.parser("inference").get_parsed_content("network_def").state_dict(), f"{models}/other/ulite.pt")
out["wrong_checkpoint"] = error_of(ULiteInfer(b3, f"{models}/other"), image3d)
print(json.dumps(out))
"""


def test_infer_task_2d_by_config_and_weight_errors(tmp_path):
    ci_requires(label_env_problem())
    bundle = tmp_path / "bundle"  # configs only: no models/model.pt whatever the working tree holds
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    override = tmp_path / "2d.json"
    override.write_text(json.dumps({"spatial_dims": 2, "pixdim": [1.0, 1.0], "roi_size": [64, 64]}))
    rng = np.random.default_rng(0)
    img2d = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(40, 60, (90, 70)).astype(np.int16), np.eye(4)), str(img2d))
    img3d = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(40, 60, (30, 30, 20)).astype(np.int16), np.eye(4)), str(img3d))

    out = json.loads(run_label_python(SNIPPET, str(bundle), str(override), str(img2d), str(img3d),
                                      str(tmp_path / "models")).strip().splitlines()[-1])
    assert out["dimension_2d"] == 2
    label = nib.load(out["label_2d"])
    assert label.shape == (90, 70)
    assert "No checkpoint" in out["no_checkpoint"] and "POST /train/ulite" in out["no_checkpoint"]
    assert "does not fit the bundle's network_def" in out["wrong_checkpoint"]


TRAIN_SNIPPET = r"""
import json, sys
from ulite_monai.bundle import Bundle
from ulite_monai.label.lib.trainers import ULiteTrain

bundle, override, model_dir, records = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])

class Store:  # the one datastore call the train task makes
    def datalist(self):
        return records

task = ULiteTrain(Bundle(bundle, override), model_dir)
print(json.dumps(task({"max_epochs": 1, "val_split": 0, "pretrained": False, "device": "cpu"}, Store())))
"""


def test_train_task_without_validation_publishes_last_weights(tmp_path):
    ci_requires(label_env_problem())
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    override = tmp_path / "small.json"
    override.write_text(json.dumps({"patch_size": [32, 32, 32], "num_samples": 1, "batch_size": 1,
                                    "cache_rate": 0.0, "num_workers": 0}))
    rng = np.random.default_rng(1)
    records = []
    for i in range(2):
        img = rng.normal(40, 30, (36, 36, 20))
        lab = np.zeros(img.shape, np.uint8)
        lab[10:24, 12:26, 6:14] = 1
        img[lab > 0] += 200
        affine = np.diag([1.5, 1.5, 2.5, 1.0])
        nib.save(nib.Nifti1Image(img.astype(np.int16), affine), str(tmp_path / f"i{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, affine), str(tmp_path / f"l{i}.nii.gz"))
        records.append({"image": str(tmp_path / f"i{i}.nii.gz"), "label": str(tmp_path / f"l{i}.nii.gz")})
    model_dir = tmp_path / "model"
    stats = json.loads(run_label_python(TRAIN_SNIPPET, str(bundle), str(override), str(model_dir),
                                        json.dumps(records)).strip().splitlines()[-1])
    assert stats["epochs"] == 1 and stats["train_records"] == 2 and stats["val_records"] == 0
    assert stats["published_from"] == "last weights" and stats["start_weights"] is None
    assert (model_dir / "ulite.pt").is_file()
    assert sorted(p.name for p in model_dir.iterdir()) == ["ulite.pt", "ulite_train_stats.json"]  # run folder gone
    assert not any(p.name != "configs" for p in bundle.iterdir()), "nothing written into the bundle"
