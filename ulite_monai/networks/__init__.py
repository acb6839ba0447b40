# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
from ulite_monai.networks.export import export_onnx, export_torchscript, onnx_session
from ulite_monai.networks.fusion import FusedULite, fuse_ulite, inference_network
from ulite_monai.networks.reference import convert_reference_state_dict, load_reference_checkpoint
from ulite_monai.networks.ulite import AxialDWConv, ULite, ULiteBottleneck, ULiteDecoderBlock, ULiteEncoderBlock

__all__ = [
    "ULite",
    "AxialDWConv",
    "ULiteEncoderBlock",
    "ULiteDecoderBlock",
    "ULiteBottleneck",
    "FusedULite",
    "fuse_ulite",
    "inference_network",
    "convert_reference_state_dict",
    "load_reference_checkpoint",
    "export_torchscript",
    "export_onnx",
    "onnx_session",
]
