# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Load checkpoints saved by the reference U-Lite training code into :class:`ULite`.

The reference code names its modules ``conv_in``, ``e1``..``e5`` (each ``dw.dw_h``, ``dw.dw_w``, ``bn``,
``pw``), ``b5`` (``pw1``, ``dw1``..``dw3``, ``bn``, ``pw2``), ``d5``..``d1`` (``pw``, ``bn``, ``dw.dw_h``,
``dw.dw_w``, ``pw2``) and ``conv_out``. Its training script saves a Lightning checkpoint whose
``state_dict`` keys carry a ``model.`` prefix; a plain ``state_dict`` works too.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping

import torch

from ulite_monai.networks.ulite import ULite

__all__ = ["convert_reference_state_dict", "load_reference_checkpoint"]

_AXES = {"dw_h": 0, "dw_w": 1}


def _strip_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = list(sd)
    for prefix in ("model.", "module.", "net."):
        if keys and all(k.startswith(prefix) for k in keys):
            return {k[len(prefix):]: v for k, v in sd.items()}
    # Lightning may mix in other objects' keys: keep the model's only
    if any(k.startswith("model.") for k in keys):
        return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return dict(sd)


def _map_key(key: str, depth: int) -> str:
    m = re.fullmatch(r"e(\d+)\.(.+)", key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        rest = re.sub(r"^dw\.(dw_[hw])", lambda g: f"dw.convs.{_AXES[g.group(1)]}", rest)
        rest = re.sub(r"^bn\.", "norm.", rest)
        return f"encoders.{i - 1}.{rest}"
    m = re.fullmatch(r"d(\d+)\.(.+)", key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        rest = re.sub(r"^dw\.(dw_[hw])", lambda g: f"dw.convs.{_AXES[g.group(1)]}", rest)
        rest = re.sub(r"^bn\.", "norm.", rest)
        return f"decoders.{depth - i}.{rest}"
    m = re.fullmatch(r"b\d+\.(.+)", key)
    if m:
        rest = m.group(1)
        rest = re.sub(
            r"^dw(\d+)\.(dw_[hw])", lambda g: f"branches.{int(g.group(1)) - 1}.convs.{_AXES[g.group(2)]}", rest
        )
        rest = re.sub(r"^bn\.", "norm.", rest)
        return f"bottleneck.{rest}"
    return key


def convert_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Rename a reference U-Lite (2D) state dict to :class:`ULite`'s parameter names.

    Accepts a plain state dict or one with a ``model.``/``module.`` prefix (Lightning, DataParallel).
    """
    sd = _strip_prefix(state_dict)
    depth = len({k.split(".")[0] for k in sd if re.fullmatch(r"e\d+", k.split(".")[0])})
    if depth == 0:
        raise ValueError(
            "this state dict has no reference U-Lite encoder keys (e1., e2., ...); "
            f"first keys: {list(sd)[:5]}. Is it a reference U-Lite checkpoint?"
        )
    return OrderedDict((_map_key(k, depth), v) for k, v in sd.items())


def load_reference_checkpoint(path_or_state: str | os.PathLike | Mapping, net: ULite | None = None,
                              strict: bool = True) -> ULite:
    """Load a checkpoint saved by the reference U-Lite code into a :class:`ULite`.

    Args:
        path_or_state: a file saved with ``torch.save`` (a plain state dict, or a Lightning checkpoint
            whose ``state_dict`` has ``model.``-prefixed keys), or such a mapping already loaded.
        net: the network to load into; by default the paper's 2D net, with in/out channels read from the
            checkpoint's stem and output conv shapes.
        strict: passed to ``load_state_dict``.

    Files are read by the bundle layer's one checkpoint reader
    (:func:`ulite_monai.bundle.weights.read_checkpoint`: ``weights_only=True``, wrappers and prefixes removed,
    reference names converted).
    """
    from ulite_monai.bundle.weights import read_checkpoint, unwrap_state_dict

    if isinstance(path_or_state, (str, os.PathLike)):
        source = os.fspath(path_or_state)
        sd, _ = read_checkpoint(path_or_state)
    else:
        source = "this state dict"
        sd = unwrap_state_dict(dict(path_or_state), source)
    if "conv_in.weight" not in sd or "encoders.0.pw.weight" not in sd:
        raise ValueError(
            f"{source} has no reference U-Lite encoder keys (e1., e2., ...); first keys: {list(sd)[:5]}. "
            "Is it a reference U-Lite checkpoint?"
        )
    if net is None:
        w_in, w_out = sd["conv_in.weight"], sd["conv_out.weight"]
        depth = len([k for k in sd if re.fullmatch(r"encoders\.\d+\.pw\.weight", k)])
        features = [w_in.shape[0]] + [sd[f"encoders.{i}.pw.weight"].shape[0] for i in range(depth)]
        net = ULite(spatial_dims=w_in.ndim - 2, in_channels=w_in.shape[1], out_channels=w_out.shape[0],
                    features=features, kernel_size=sd["encoders.0.dw.convs.0.weight"].shape[2],
                    stem_kernel_size=w_in.shape[2])
    net.load_state_dict(sd, strict=strict)
    return net
