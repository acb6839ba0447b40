# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The bundle's inference pipeline as one object: network, preprocessing, inferer, postprocessing.

Everything comes from the bundle's ``inference.json`` (plus override files and settings): the config's
``network_def`` with the weights of its ``ckpt_path``, made ready by :func:`~ulite_monai.bundle.load_network`
(the function the config's own ``network`` calls: eval mode, fused when ``use_fused``) on the config's
``device``, run under autocast when ``amp`` is on and the device is CUDA, as the config's
``SupervisedEvaluator`` runs it. The steps mirror that evaluator: preprocess, collate, ``inferer(inputs, network)``, decollate,
postprocess (``Invertd`` back to the input grid, ``SaveImaged`` into ``output_dir``).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import torch

from ulite_monai.bundle.config import Bundle
from ulite_monai.bundle.helpers import load_network
from ulite_monai.bundle.weights import load_weights

__all__ = ["InferencePipeline", "resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else the CPU; otherwise the named device (checked).

    Raises:
        ValueError: CUDA asked for but not available.
    """
    if device is None or str(device) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use cpu (--device cpu).")
    return dev


class InferencePipeline:
    """Load a bundle's inference pipeline once; run it on one image at a time.

    Args:
        bundle: the bundle (a :class:`Bundle`, or a folder for ``Bundle(folder)``).
        config: the config name (``inference``).
        device: ``"auto"``/``None`` (the config's ``device`` when it names one, else CUDA when available), or a
            device name; set as the config's ``device``.
        checkpoint: weights file; set as the config's ``ckpt_path`` (default: the config's, ``models/model.pt``).
        random_weights: no checkpoint: the network keeps a seeded (reproducible) random initialisation, and
            :attr:`weights_id` says ``random-init`` (smoke tests, throughput runs).
        fuse: set the config's ``use_fused`` (``None`` keeps the config's).
        amp: set the config's ``amp`` (``None`` keeps the config's); autocast is used on CUDA only.
        output_dir: set the config's ``output_dir`` (where ``SaveImaged`` writes).
        overrides: further ``{id: value}`` settings.
        quiet: the postprocessing's ``SaveImaged`` does not print each file it writes (a caller that records
            its outputs, such as the batch manifest, says so itself).

    Raises:
        FileNotFoundError: the checkpoint does not exist (and ``random_weights`` is off).
        KeyError: the config lacks one of ``network_def``, ``preprocessing``, ``inferer``, ``postprocessing``.
        CheckpointError: the checkpoint cannot be read or does not fit ``network_def``.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike | None = None,
        config: str = "inference",
        device: str | torch.device | None = None,
        checkpoint: str | os.PathLike | None = None,
        random_weights: bool = False,
        fuse: bool | None = None,
        amp: bool | None = None,
        output_dir: str | os.PathLike | None = None,
        overrides: dict[str, Any] | None = None,
        quiet: bool = False,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        if random_weights and checkpoint:
            raise ValueError("give either a checkpoint or random weights, not both.")
        settings: dict[str, Any] = dict(overrides or {})
        if device is not None and str(device) not in ("", "auto"):
            settings["device"] = f"$torch.device('{resolve_device(device)}')"
        elif device is not None:
            settings["device"] = f"$torch.device('{resolve_device(None)}')"
        if checkpoint:
            settings["ckpt_path"] = str(checkpoint)
        if random_weights:
            settings["ckpt_path"] = None
        if fuse is not None:
            settings["use_fused"] = bool(fuse)
        if amp is not None:
            settings["amp"] = bool(amp)
        if output_dir is not None:
            settings["output_dir"] = str(output_dir)
        self.parser = parser = self.bundle.parser(config, **settings)
        for required in ("network_def", "preprocessing", "inferer", "postprocessing"):
            if required not in parser:
                raise KeyError(f"bundle config {config}.json of {self.bundle.root} has no '{required}'.")
        self.info = self.bundle.info(parser)
        self.device = resolve_device(parser.get_parsed_content("device") if "device" in parser else None)
        self.amp = bool(parser.get_parsed_content("amp")) if "amp" in parser else False
        self.fused = bool(parser.get_parsed_content("use_fused")) if "use_fused" in parser else False
        ckpt = parser.get_parsed_content("ckpt_path") if "ckpt_path" in parser else None
        if not random_weights and not (ckpt and os.path.isfile(ckpt)):
            raise FileNotFoundError(
                f"model weights {ckpt or '(no ckpt_path in the config)'} not found; train the bundle (python -m "
                "monai.bundle run training --config_file bundles/ulite/configs/train.json) or pass a checkpoint."
            )
        self.checkpoint = str(ckpt) if ckpt else None
        if not ckpt:
            torch.manual_seed(0)  # the random initialisation is the same on every run
        network = parser.get_parsed_content("network_def")
        self.weights_id = load_weights(network, ckpt) if ckpt else "random-init"
        self.network = load_network(network, None, self.device, fuse=self.fused)
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        self.postprocessing = parser.get_parsed_content("postprocessing")
        self._observers: list = []
        if quiet:
            from monai.transforms import SaveImaged

            for t in getattr(self.postprocessing, "transforms", ()):
                if isinstance(t, SaveImaged):
                    t.set_options(write_kwargs={"verbose": False})

    # -- identity --------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def model_version(self) -> str:
        """Bundle name, version and weights identity (what a rerun compares to decide what to redo)."""
        return f"{self.name} {self.version} {self.weights_id}"

    def describe(self) -> dict:
        return {
            "bundle": str(self.bundle.root),
            "name": self.name,
            "version": self.version,
            "weights": self.weights_id,
            "device": str(self.device),
            "fused": self.fused,
            "amp": self.autocast_enabled,
            "channel_def": self.info.channel_def,
        }

    # -- steps -----------------------------------------------------------------------------------------------
    @property
    def autocast_enabled(self) -> bool:
        return self.amp and self.device.type == "cuda"

    def autocast(self):
        """The autocast context the config's evaluator would use (fp16 on CUDA when ``amp``; none otherwise)."""
        if self.autocast_enabled:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def preprocess(self, image: Any) -> dict:
        """The bundle's preprocessing on ``{image_key: image}`` (a path, or what the reader accepts)."""
        return self.preprocessing({self.info.image_key: image})

    def observe(self, fn) -> None:
        """Call ``fn(prediction)`` with every raw network output :meth:`predict` returns (before postprocessing),
        e.g. to measure the model's confidence without running it twice."""
        self._observers.append(fn)

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inferer(inputs, network)`` on the pipeline's device, without gradients, under :meth:`autocast`."""
        with torch.no_grad(), self.autocast():
            pred = self.inferer(inputs.to(self.device), self.network)
        for fn in self._observers:
            fn(pred)
        return pred

    def infer_and_postprocess(self, data: dict) -> tuple[dict, float, float]:
        """Inferer and postprocessing on one preprocessed item; returns (output dict, model s, postprocess s)."""
        from monai.data import decollate_batch, list_data_collate

        batch = list_data_collate([data])
        t0 = time.perf_counter()
        pred = self.predict(batch[self.info.image_key])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t1 = time.perf_counter()
        batch[self.info.pred_key] = pred.float()
        item = decollate_batch(batch)[0]
        out = self.postprocessing(item)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out, t1 - t0, time.perf_counter() - t1

    def __call__(self, image: Any) -> dict:
        """Preprocess, infer and postprocess one image; the output dict (the prediction under ``pred_key``)."""
        return self.infer_and_postprocess(self.preprocess(image))[0]
