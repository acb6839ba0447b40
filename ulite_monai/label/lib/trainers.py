"""MONAI Label train task for U-Lite: the bundle's ``train.json`` run on the datastore's labelled images."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any

import torch
from monai.data import partition_dataset
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import device_list, name_to_device

from ulite_monai.bundle import Bundle, CheckpointError, load_weights, read_checkpoint
from ulite_monai.utils import save_atomically, save_json_atomically

if TYPE_CHECKING:
    from monai.bundle import ConfigWorkflow

logger = logging.getLogger(__name__)

__all__ = ["ULiteTrain"]


class ULiteTrain(TrainTask):
    """Fine-tune (or train from scratch) U-Lite on the labelled images of the datastore.

    The bundle's ``train.json`` (with the app's config overrides) runs unchanged as a MONAI
    ``ConfigWorkflow`` (:meth:`ulite_monai.bundle.Bundle.workflow`); this task only swaps in the datalist from the datastore, the epoch budget, the
    device and an output folder under ``model_dir``. The best checkpoint (or, without validation data, the last
    weights) is published atomically as ``model_dir/<name>.pt``, which the infer task picks up on its next request.

    Args:
        bundle: the bundle (and config overrides).
        model_dir: where ``<name>.pt``, ``<name>_train_stats.json`` and the run folders go.
        name: model name in MONAI Label.
        pretrained_paths: checkpoints to start from, the last existing one wins (``pretrained`` option).
    """

    def __init__(self, bundle: Bundle, model_dir: str, name: str = "ulite", pretrained_paths=()):
        super().__init__(f"Train U-Lite with the bundle's train.json ({bundle.metadata.get('description', '')})")
        self.bundle = bundle
        self.model_dir = model_dir
        self.name = name
        self.pretrained_paths = list(pretrained_paths)
        bundle.config_files("train")  # fail at start, not at the first train request, when train.json is missing

    @property
    def published_path(self) -> str:
        return os.path.join(self.model_dir, f"{self.name}.pt")

    @property
    def stats_path(self) -> str:
        return os.path.join(self.model_dir, f"{self.name}_train_stats.json")

    def config(self) -> dict[str, Any]:
        return {
            "device": device_list(),
            "max_epochs": 10,
            "val_split": 0.2,
            "pretrained": True,
            "seed": 0,
            "val_interval": 0,  # 0: the bundle's, capped at max_epochs
        }

    def stats(self) -> dict[str, Any]:
        if os.path.isfile(self.stats_path):
            with open(self.stats_path) as f:
                return json.load(f)
        return {}

    def _datalist(self, datastore: Datastore, request: dict) -> tuple[list[dict], list[dict]]:
        records = [{"image": d["image"], "label": d["label"]} for d in datastore.datalist() if d and d.get("label")]
        if not records:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                "No labelled images in the datastore: save at least one final label before training.",
            )
        val_split = float(request.get("val_split", 0.2))
        if val_split > 0 and len(records) >= 2:
            n_val = max(1, round(len(records) * val_split))
            train, val = partition_dataset(
                records, ratios=[len(records) - n_val, n_val], shuffle=True, seed=int(request.get("seed", 0))
            )
        else:
            train, val = records, []
        return train, val

    def _start_weights(self, request: dict) -> str | None:
        if str(request.get("pretrained", True)).lower() in ("false", "0", "no", "none"):
            return None
        existing = [p for p in [*self.pretrained_paths, self.published_path] if os.path.isfile(p)]
        return existing[-1] if existing else None

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        t0 = time.time()
        os.makedirs(self.model_dir, exist_ok=True)
        train_ds, val_ds = self._datalist(datastore, request)
        max_epochs = int(request.get("max_epochs", 10))
        device = name_to_device(request.get("device"))
        run_dir = tempfile.mkdtemp(prefix=f"{self.name}_run_", dir=self.model_dir)
        try:
            return self._train(request, train_ds, val_ds, max_epochs, device, run_dir, t0)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    def _train(self, request, train_ds, val_ds, max_epochs, device, run_dir, t0) -> dict[str, Any]:
        logger.info(f"Train {self.name}: {len(train_ds)} train / {len(val_ds)} val records, {max_epochs} epochs, "
                    f"device {device}, run folder {run_dir}")

        overrides: dict[str, Any] = {
            "device": f"$torch.device('{device}')",
            "progress_bar": False,  # tqdm bars would flood the task log MONAI Label keeps
        }
        workflow = self.bundle.workflow("train", "train")
        parser = workflow.parser
        # the datastore's labelled images replace the bundle's dataset (its own ids if it has them)
        overrides["train_datalist" if "train_datalist" in parser else "train#dataset#data"] = train_ds
        overrides["val_datalist" if "val_datalist" in parser else "validate#dataset#data"] = val_ds
        overrides["max_epochs" if "max_epochs" in parser else "train#trainer#max_epochs"] = max_epochs
        if val_ds and "val_interval" in parser:  # validate at least once, so a best checkpoint exists
            interval = int(request.get("val_interval") or parser.get_parsed_content("val_interval"))
            overrides["val_interval"] = max(1, min(interval, max_epochs))
        # outputs of the bundle go to the run folder, never into the bundle itself
        for key in ("ckpt_dir", "output_dir", "log_dir"):
            overrides[key] = os.path.join(run_dir, key.removesuffix("_dir"))
        extra = request.get("bundle_overrides") or {}
        if isinstance(extra, str):
            extra = json.loads(extra)
        overrides.update(extra)

        for k, v in overrides.items():
            parser[k] = v
        if not val_ds:
            self._drop_validation(workflow)
        workflow.initialize()

        network = workflow.parser.get_parsed_content("network")
        start = self._start_weights(request)
        if start:
            try:
                load_weights(network, start)
            except CheckpointError as e:
                raise ValueError(
                    f"Cannot start from {start}: it does not fit the configured network ({str(e)[:300]}...). "
                    'Train from scratch with {"pretrained": false}, or remove that checkpoint.'
                ) from e
            logger.info(f"Starting from {start}")
        workflow.run()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        best = os.path.join(overrides["ckpt_dir"], "model.pt")  # the bundle's CheckpointSaver: best val metric
        best = best if val_ds and os.path.isfile(best) else None
        state = read_checkpoint(best, expected_keys=network.state_dict().keys())[0] if best else {k: v.detach().cpu() for k, v in network.state_dict().items()}
        save_atomically(lambda tmp: torch.save(state, tmp), self.published_path)
        workflow.finalize()

        evaluator = workflow.parser.get_parsed_content("validate#evaluator") if val_ds else None
        stats = {
            "model": self.name,
            "checkpoint": self.published_path,
            "start_weights": start,
            "epochs": int(trainer.state.epoch),
            "train_records": len(train_ds),
            "val_records": len(val_ds),
            "best_metric": float(evaluator.state.best_metric) if evaluator is not None else None,
            "best_metric_epoch": int(evaluator.state.best_metric_epoch) if evaluator is not None else None,
            "published_from": best or "last weights",
            "total_time_s": round(time.time() - t0, 2),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        save_json_atomically(stats, self.stats_path)
        logger.info(f"Train {self.name} finished: {stats}")
        return stats

    @staticmethod
    def _drop_validation(workflow: ConfigWorkflow) -> None:
        """Without validation records, remove the ValidationHandler so training runs on its own."""
        handlers = workflow.parser.get("train#handlers", [])
        kept = [h for h in handlers if "ValidationHandler" not in str(h.get("_target_", ""))]
        workflow.parser["train#handlers"] = kept
