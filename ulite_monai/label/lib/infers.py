"""MONAI Label infer task for U-Lite, built from the bundle's ``inference.json``."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any, Callable

import torch
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import Compose, Lambdad, LoadImaged, SaveImaged
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.transform.pre import LoadImageTensord

from ulite_monai.bundle import Bundle, CheckpointError, load_network, load_weights

logger = logging.getLogger(__name__)

__all__ = ["ULiteInfer"]


class ULiteInfer(BasicInferTask):
    """Segmentation with U-Lite, running the bundle's ``preprocessing``, ``inferer`` and ``postprocessing``.

    Args:
        bundle: the bundle (and config overrides) to serve.
        model_dir: where the app's train task publishes ``<name>.pt``; that checkpoint, when present, wins over
            the bundle's own (the config's ``ckpt_path``, ``models/model.pt``).
        name: model name in MONAI Label (``ulite``), also the checkpoint file name.
        fuse: run the fused (BatchNorm-folded) network; ``None`` follows the config's ``use_fused`` (default on).
        amp: mixed precision (fp16 autocast) on CUDA; ``None`` follows the config's ``amp`` (on where CUDA is
            available). Never used on the CPU.
        preload: load the network when the app starts rather than on the first request.
    """

    def __init__(
        self,
        bundle: Bundle,
        model_dir: str,
        name: str = "ulite",
        fuse: bool | None = None,
        amp: bool | None = None,
        preload: bool = False,
        **kwargs: Any,
    ):
        self.bundle = bundle
        self.parser = bundle.parser("inference")
        if fuse is None:
            fuse = bool(self.parser.get_parsed_content("use_fused")) if "use_fused" in self.parser else True
        self.fuse = fuse
        if amp is None:
            amp = bool(self.parser.get_parsed_content("amp")) if "amp" in self.parser else False
        self.amp = amp
        self._lock = threading.Lock()
        self._local = threading.local()
        info = bundle.info(self.parser)
        if not info.labels:
            raise ValueError(f"{bundle.meta_file}: network_data_format.outputs has no foreground channel_def.")
        network = self.parser.get_parsed_content("network_def", instantiate=True)
        bundle_ckpt = self.parser.get_parsed_content("ckpt_path") if "ckpt_path" in self.parser else None
        paths = [p for p in (bundle_ckpt, os.path.join(model_dir, f"{name}.pt")) if p]
        super().__init__(
            path=paths,
            network=network,
            type=InferType.SEGMENTATION,
            labels=info.labels,
            dimension=info.spatial_dims,
            description=f"U-Lite {info.spatial_dims}D segmentation ({info.description or info.name})",
            input_key=info.image_key,
            output_label_key=info.pred_key,
            load_strict=True,
            preload=preload and any(os.path.isfile(p) for p in paths),  # nothing to preload before training
            **kwargs,
        )

    # --- the pipeline, from the bundle ----------------------------------------------------------------------------
    # One request parses the config once: the Invertd of `postprocessing` must see the very transform objects that
    # `preprocessing` applied. MONAI Label calls pre_transforms, inferer and post_transforms of one request on one
    # thread, so the parser of the request lives in a thread-local.
    def _request_parser(self, fresh: bool = False):
        if fresh or getattr(self._local, "parser", None) is None:
            self._local.parser = self.bundle.parser("inference")
        return self._local.parser

    def _parsed_list(self, key: str, fresh: bool = False) -> list[Callable]:
        parser = self._request_parser(fresh)
        if key not in parser:
            return []
        content = parser.get_parsed_content(key, instantiate=True)
        return list(content.transforms) if isinstance(content, Compose) else list(content)

    def pre_transforms(self, data: Any = None) -> Sequence[Callable]:
        pre = []
        for t in self._parsed_list("preprocessing", fresh=True):
            # MONAI Label sessions may hand over an already loaded array; the wrapper loads paths as before.
            pre.append(LoadImageTensord(keys=t.keys, load_image_d=t) if isinstance(t, LoadImaged) else t)
        return pre

    def inferer(self, data: Any = None) -> Inferer:
        parser = self._request_parser()
        if "inferer" not in parser:
            return SimpleInferer()
        return parser.get_parsed_content("inferer", instantiate=True)

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cuda") -> dict:
        """The inferer as MONAI Label runs it, under fp16 autocast on CUDA when ``amp`` (as the bundle's evaluator)."""
        if not (self.amp and str(device).startswith("cuda")):
            return super().run_inferer(data, convert_to_batch=convert_to_batch, device=device)
        with torch.autocast("cuda", dtype=torch.float16):
            data = super().run_inferer(data, convert_to_batch=convert_to_batch, device=device)
        data[self.output_label_key] = data[self.output_label_key].float()
        return data

    def inverse_transforms(self, data: Any = None) -> None:
        return None  # the bundle's postprocessing inverts the preprocessing itself (Invertd)

    def post_transforms(self, data: Any = None) -> Sequence[Callable]:
        # The server writes the result itself; the bundle's SaveImaged would leave copies on disk.
        # The bundle's Invertd has put the prediction back on the input's grid (its affine travels with the
        # MetaTensor, which MONAI Label's writer uses); the writer wants the label without its channel axis.
        post = [t for t in self._parsed_list("postprocessing") if not isinstance(t, SaveImaged)]
        post.append(Lambdad(keys=self.output_label_key, func=self._drop_channel))
        return post

    def _drop_channel(self, pred: Any) -> Any:
        return pred[0] if pred.ndim == self.dimension + 1 and pred.shape[0] == 1 else pred

    # --- weights ------------------------------------------------------------------------------------------------
    def _get_network(self, device: str, data: Any) -> torch.nn.Module:
        path = self.get_path()
        if not path:
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR,
                f"No checkpoint for U-Lite: {' nor '.join(self.path)} exists. "
                "Train the model first (POST /train/ulite, or the Train button of your client) or train the bundle "
                "(make demo) so that its models/model.pt exists.",
            )
        mtime = os.stat(path).st_mtime_ns
        with self._lock:
            cached = self._networks.get(device)
            if cached and cached[1] == (path, mtime):
                return cached[0]
            network, digest = self._build(path, torch.device(device))
            self._networks[device] = (network, (path, mtime), digest)
            logger.info(f"U-Lite weights loaded from {path} on {device}")
            return network

    def _build(self, path: str, device: torch.device) -> tuple[torch.nn.Module, str]:
        """The configured network with the checkpoint's weights (fused if asked) on ``device``, and the
        checkpoint's digest."""
        network = self.parser.get_parsed_content("network_def", instantiate=True, lazy=False)
        try:
            weights_id = load_weights(network, path)
        except CheckpointError as e:  # not loadable weights-only, no state dict inside, or another network's
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR,
                f"{e} Was it trained with other config overrides (2D/3D, channels, labels)?",
            ) from e
        return load_network(network, None, device, fuse=self.fuse), weights_id.removeprefix("sha256:")

    def writer(self, data: dict, extension: Any = None, dtype: Any = None) -> tuple[Any, Any]:
        if (self.dimension == 2 and extension is None and not data.get("result_extension")
                and _is_picture(data.get("image_path"))):
            # a 2D label of a picture as a lossless 8-bit PNG (MONAI Label would reuse the image's extension,
            # e.g. JPEG); a 2D NIfTI/NRRD image keeps its format and geometry
            extension, dtype = ".png", dtype or "uint8"
        result_file, result_json = super().writer(data, extension=extension, dtype=dtype)
        cached = self._networks.get(data.get("device"))
        if cached:
            result_json = dict(result_json or {})
            result_json["checkpoint"] = cached[1][0]
            result_json["checkpoint_sha256"] = cached[2]
        return result_file, result_json


PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _is_picture(path: Any) -> bool:
    """Whether ``path`` names an ordinary picture file (PNG/JPEG/TIFF/BMP) rather than a medical image."""
    return isinstance(path, str) and path.lower().endswith(PICTURE_SUFFIXES)
