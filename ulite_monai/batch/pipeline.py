# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The bundle's inference pipeline, loaded once for a batch.

``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing`` come from the bundle's
``configs/inference.json`` (plus optional override files) through ``monai.bundle.ConfigParser``;
nothing here re-implements a transform. A series enters the pipeline as an image file (the
batch writes a DICOM series as an uncompressed NRRD: double-precision geometry, read by the
bundle's own ``LoadImaged`` reader), so the bundle chain runs from its first transform, and the
same code path serves NIfTI/NRRD inputs. The steps mirror MONAI's ``SupervisedEvaluator``:
preprocess, collate, ``inferer(inputs, network)``, decollate, postprocess (``Invertd`` back to the
input grid, ``SaveImaged`` into a staging folder that the batch then renames atomically).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ulite_monai.utils import save_json_atomically

__all__ = ["BundlePipeline", "resolve_device"]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class BundlePipeline:
    """Load a bundle's inference pipeline.

    Args:
        bundle_dir: bundle root (holds ``configs/inference.json`` and ``configs/metadata.json``).
        config_files: config files merged in order (default ``[configs/inference.json]``); later files
            override earlier ones (e.g. ``configs/*.json`` overrides of this project).
        staging_dir: folder the bundle's ``SaveImaged`` writes into (``output_dir`` is overridden).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        checkpoint: weights file (default ``<bundle>/models/model.pt``), loaded with ``weights_only=True``.
        allow_random_weights: ignore checkpoints and run the network with a seeded random
            initialisation (tests, throughput measurements); the model version then says ``random-init``.
        fuse: use :func:`ulite_monai.networks.inference_network` (BN folded) for inference.
        overrides: extra ``id -> value`` settings applied to the parser (e.g. ``{"inferer#sw_batch_size": 2}``).
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        staging_dir: str | os.PathLike,
        config_files: Sequence[str | os.PathLike] | None = None,
        device: str | None = "auto",
        checkpoint: str | os.PathLike | None = None,
        allow_random_weights: bool = False,
        fuse: bool = True,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        from monai.bundle import ConfigParser

        self.bundle_dir = Path(bundle_dir)
        configs = [Path(c) for c in (config_files or [self.bundle_dir / "configs" / "inference.json"])]
        for c in configs:
            if not c.is_file():
                raise FileNotFoundError(
                    f"bundle config {c} not found; pass --bundle <bundle folder> or --config <file>"
                )
        meta_file = self.bundle_dir / "configs" / "metadata.json"
        self.device = resolve_device(device)
        parser = ConfigParser()
        if meta_file.is_file():
            parser.read_meta(str(meta_file))
        parser.read_config([str(c) for c in configs])
        parser["bundle_root"] = str(self.bundle_dir)
        parser["output_dir"] = str(staging_dir)
        parser["device"] = f"$torch.device('{self.device}')"
        for k, v in (overrides or {}).items():
            parser[k] = v
        for required in ("network_def", "preprocessing", "inferer", "postprocessing"):
            if required not in parser:
                raise KeyError(f"bundle config {configs[-1]} has no '{required}'; it is not an inference config")
        self.parser = parser
        self.meta = parser.get("_meta_", {}) or {}
        self.image_key = parser.get("image_key", "image") if "image_key" in parser else "image"
        self.pred_key = parser.get("pred_key", "pred") if "pred_key" in parser else "pred"
        net = parser.get_parsed_content("network_def")
        self.weights_id = self._load_weights(net, checkpoint, allow_random_weights)
        if fuse:
            from ulite_monai.networks import inference_network

            net = inference_network(net.eval())
        self.network = net.to(self.device).eval()
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        self.postprocessing = parser.get_parsed_content("postprocessing")
        self._quiet_savers(self.postprocessing)
        self.staging_dir = Path(staging_dir)

    @staticmethod
    def _quiet_savers(transform) -> None:
        """The manifest records every file; the bundle's SaveImaged need not print each one."""
        from monai.transforms import SaveImaged

        for t in getattr(transform, "transforms", ()):
            if isinstance(t, SaveImaged):
                t.set_options(write_kwargs={"verbose": False})

    # -- identity -------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.bundle_dir.name))

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "0"))

    @property
    def model_version(self) -> str:
        """Bundle name + version + weights identity: the resume key."""
        return f"{self.name} {self.version} {self.weights_id}"

    @property
    def channel_def(self) -> dict:
        try:
            return dict(self.meta["network_data_format"]["outputs"]["pred"]["channel_def"])
        except (KeyError, TypeError):
            return {}

    def _load_weights(self, net: torch.nn.Module, checkpoint, allow_random: bool) -> str:
        ckpt = Path(checkpoint) if checkpoint else self.bundle_dir / "models" / "model.pt"
        if allow_random and checkpoint:
            raise ValueError("give either a checkpoint or random weights, not both")
        if not allow_random and not ckpt.is_file():
            raise FileNotFoundError(
                f"model weights {ckpt} not found; train the bundle or pass --checkpoint "
                "(or --random-weights for a smoke test)"
            )
        if allow_random:
            torch.manual_seed(0)
            for m in net.modules():  # deterministic random init so reruns share a model version
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            return "random-init"
        state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            for key in ("model", "network", "state_dict", "net"):
                if key in state and isinstance(state[key], dict):
                    state = state[key]
                    break
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            detail = str(e).strip().splitlines()
            raise RuntimeError(
                f"checkpoint {ckpt} does not fit the bundle's network_def ({len(detail) - 1} mismatching entries, "
                f"first: {detail[1].strip() if len(detail) > 1 else detail[0]}); check the config overrides "
                "(features, channels, spatial_dims) the checkpoint was trained with"
            ) from e
        return "sha256:" + _sha256(ckpt)[:16]

    # -- steps ----------------------------------------------------------------------------------------
    def preprocess(self, image_path: str) -> dict:
        """The bundle's preprocessing on ``{image_key: image_path}`` (thread-safe for inference transforms)."""
        return self.preprocessing({self.image_key: image_path})

    def infer_and_postprocess(self, data: dict) -> tuple[dict, float, float]:
        """Run inferer + postprocessing like ``SupervisedEvaluator``; returns (output dict, model s, post s)."""
        from monai.data import decollate_batch, list_data_collate

        batch = list_data_collate([data])
        inputs = batch[self.image_key].to(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            pred = self.inferer(inputs, self.network)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t1 = time.perf_counter()
        batch[self.pred_key] = pred
        del inputs
        item = decollate_batch(batch)[0]
        out = self.postprocessing(item)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out, t1 - t0, time.perf_counter() - t1

    def describe(self) -> dict:
        return {
            "bundle": str(self.bundle_dir),
            "name": self.name,
            "version": self.version,
            "weights": self.weights_id,
            "device": str(self.device),
            "channel_def": self.channel_def,
        }


def label_array(pred: Any) -> np.ndarray:
    """An integer label array (spatial dims only) from the postprocessed prediction."""
    arr = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    if arr.ndim == 4:  # channel-first
        arr = arr[0] if arr.shape[0] == 1 else np.argmax(arr, axis=0)
    return np.rint(arr).astype(np.uint8)


def to_volume_order(
    labels_xyz: np.ndarray, pred_affine_ras: np.ndarray, volume_affine_ras: np.ndarray, shape_krc
) -> np.ndarray:
    """Reorder a label array given on ``pred_affine_ras`` onto the series grid ``[slice, row, column]``.

    The two grids must coincide up to axis permutation and flips (what ``Invertd`` restores);
    anything else raises ValueError (a bundle whose postprocessing does not invert its resampling).
    """
    m = np.linalg.inv(volume_affine_ras) @ np.asarray(pred_affine_ras, dtype=np.float64)
    rot = m[:3, :3]
    target_axis, signs = [], []
    for a in range(3):
        b = int(np.argmax(np.abs(rot[:, a])))
        target_axis.append(b)
        signs.append(float(np.sign(rot[b, a])))
    perm_ok = sorted(target_axis) == [0, 1, 2] and np.allclose(np.abs(rot), np.abs(np.round(rot)), atol=1e-3)
    if not perm_ok or not np.allclose(np.abs(np.round(rot)).sum(axis=0), 1):
        raise ValueError(
            "the postprocessed prediction is not on the input grid (no Invertd in the bundle postprocessing?); "
            f"index mapping {np.round(rot, 4).tolist()}"
        )
    arr = np.transpose(labels_xyz, [target_axis.index(b) for b in range(3)])  # axes now (column, row, slice)
    size_crk = (shape_krc[2], shape_krc[1], shape_krc[0])
    if tuple(arr.shape) != tuple(size_crk):
        raise ValueError(f"prediction grid {arr.shape} does not match the series grid {size_crk}")
    for a in range(3):
        b = target_axis[a]
        expected = 0.0 if signs[a] > 0 else size_crk[b] - 1
        if abs(m[b, 3] - expected) > 1e-2:
            raise ValueError(f"prediction grid is shifted against the series grid (axis {b}: {m[b, 3]:.3f} voxels)")
        if signs[a] < 0:
            arr = np.flip(arr, axis=b)
    return np.ascontiguousarray(arr.transpose(2, 1, 0))


def write_json_atomic(path: Path, obj: Any) -> None:
    save_json_atomically(obj, path)
