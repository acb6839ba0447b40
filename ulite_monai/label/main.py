"""MONAI Label app serving U-Lite from the project's bundle.

Start it with ``make label-server`` or::

    .venv-label/bin/python -m ulite_monai.label.serve --studies /path/to/nifti/folder
    # which runs: monailabel start_server --app ulite_monai/label --studies ... --host 127.0.0.1

Options (``--conf KEY VALUE`` of ``monailabel start_server``):

- ``bundle``: bundle folder (default: ``bundles/ulite`` of this source tree; ``bundles/ulite_2d`` serves the
  paper's 2D model on PNG/JPEG/DICOM images).
- ``configs``: comma-separated config files merged onto the bundle's inference.json and train.json,
  e.g. ``bundles/ulite_2d/configs/inference_slicewise.json`` (the 2D model slice by slice).
- ``model_dir``: where trained checkpoints are published (default: ``model/`` in this app folder).
- ``fuse``: ``true``/``false``: run the BatchNorm-folded network (default: the config's ``use_fused``).
- ``amp``: ``true``/``false``: fp16 autocast on CUDA (default: the config's ``amp``, on where CUDA is available).
- ``preload``: ``true`` loads the weights at start.

Nothing is downloaded: the network, configs and weights are local.
"""

from __future__ import annotations

import logging
import os

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import strtobool

from ulite_monai.bundle import Bundle
from ulite_monai.label.lib.infers import ULiteInfer
from ulite_monai.label.lib.trainers import ULiteTrain

logger = logging.getLogger(__name__)

MODEL_NAME = "ulite"


class ULiteApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.bundle = Bundle(conf.get("bundle") or None, conf.get("configs") or None)
        self.model_dir = os.path.abspath(conf.get("model_dir") or os.path.join(app_dir, "model"))
        os.makedirs(self.model_dir, exist_ok=True)
        logger.info(f"U-Lite bundle: {self.bundle.root}; override files: {self.bundle.files}; "
                    f"trained checkpoints: {self.model_dir}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"U-Lite ({monailabel.__version__})",
            description="U-Lite lightweight axial depthwise U-Net, served from the ulite MONAI bundle",
            version=self.bundle.version,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infer = ULiteInfer(
            self.bundle,
            self.model_dir,
            name=MODEL_NAME,
            fuse=strtobool(self.conf["fuse"]) if "fuse" in self.conf else None,
            amp=strtobool(self.conf["amp"]) if "amp" in self.conf else None,
            preload=strtobool(self.conf.get("preload", "false")),
        )
        return {MODEL_NAME: infer}

    def init_trainers(self) -> dict[str, TrainTask]:
        parser = self.bundle.parser("inference")
        bundle_model = parser.get_parsed_content("ckpt_path") if "ckpt_path" in parser else None
        return {
            MODEL_NAME: ULiteTrain(
                self.bundle, self.model_dir, name=MODEL_NAME, pretrained_paths=[bundle_model] if bundle_model else []
            )
        }

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}
