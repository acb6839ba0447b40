# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The one checkpoint reader: weights only, plain or wrapped, any common prefix, reference-code names.

Accepted layouts (after ``torch.load(..., weights_only=True)``):

- a plain state dict ``{name: tensor}``;
- a wrapper dict holding it under ``model`` (the bundle's ``CheckpointSaver``), ``network``, ``state_dict``
  (Lightning) or ``net``;
- keys prefixed ``module.`` (``DataParallel``/``DistributedDataParallel`` saved with ``torch.save``),
  ``_orig_mod.`` (``torch.compile``), ``model.`` (Lightning modules holding the network as ``self.model``; removed
  only when the target network's own names do not start with it, as MONAI's UNet's do);
- checkpoints of the reference U-Lite code (``e1..e5``, ``b5``, ``d1..d5`` module names), renamed by
  :func:`ulite_monai.networks.convert_reference_state_dict`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["CheckpointError", "file_digest", "read_checkpoint", "unwrap_state_dict", "load_weights"]

_WRAPPER_KEYS = ("model", "network", "state_dict", "net")
_WRAPPERS = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile: never part of a network's own names
_HOLDERS = ("model.", "net.")  # a module holding the network as an attribute (Lightning's self.model)
_REFERENCE_KEY = re.compile(r"^e\d+\.dw\.dw_[hw]\.weight$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, holds no state dict, or does not fit the network (names the file)."""


def file_digest(path: str | os.PathLike, n: int = 16) -> str:
    """The first ``n`` hex digits of the file's SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def _strip(state: dict, prefixes: tuple[str, ...]) -> dict:
    """``state`` with a prefix that every key carries removed, repeatedly."""
    changed = True
    while changed and state:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _variants(state: dict) -> tuple[list[dict], list[dict]]:
    """Readings of a state dict, most literal first: wrappers (``module.``, ``_orig_mod.``) removed; then a
    ``model.``/``net.`` prefix every key carries removed; then the ``model.`` keys of a Lightning module kept
    (other modules' keys dropped). Second list: those of them with the reference code's names, renamed."""
    plain = [_strip(state, _WRAPPERS)]
    plain.append(_strip(plain[0], _WRAPPERS + _HOLDERS))
    if any(k.startswith("model.") for k in plain[0]):
        plain.append(_strip({k[len("model."):]: v for k, v in plain[0].items() if k.startswith("model.")}, _WRAPPERS))
    from ulite_monai.networks.reference import convert_reference_state_dict

    renamed = [dict(convert_reference_state_dict(v)) for v in plain if any(_REFERENCE_KEY.match(k) for k in v)]
    return plain, renamed


def unwrap_state_dict(obj: object, source: str = "checkpoint", expected_keys=None) -> dict[str, torch.Tensor]:
    """The network's state dict inside a loaded checkpoint (see the module docstring for the layouts).

    Args:
        obj: what ``torch.load`` returned.
        source: named in errors.
        expected_keys: the target network's state-dict keys. A holder prefix (``model.``, ``net.``) is only
            removed when that makes the keys fit (MONAI's UNet, for one, names its own parameters ``model.*``);
            without ``expected_keys`` only the wrapper prefixes are removed and reference names converted.

    Raises:
        CheckpointError: no mapping of names to tensors inside.
    """
    for _ in range(3):  # e.g. {"state_dict": {"model.x": ...}} or {"model": {"module.x": ...}}
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None and not all(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds no state dict (got {type(obj).__name__}).")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{source} holds no state dict (expected a mapping of parameter names to tensors).")
    plain, renamed = _variants(state)
    if expected_keys is None:
        return renamed[-1] if renamed else plain[0]
    expected = set(expected_keys)
    candidates = plain + renamed
    exact = [v for v in candidates if set(v) == expected]
    return exact[0] if exact else max(candidates, key=lambda v: len(expected & set(v)))


def read_checkpoint(path: str | os.PathLike, n: int = 16, expected_keys=None) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of a checkpoint file and the SHA-256 (first ``n`` hex digits) of the bytes it was read from.

    ``expected_keys``: the target network's state-dict keys (see :func:`unwrap_state_dict`).

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: not loadable with ``weights_only=True`` (pickled code, truncated, not a torch file) or
            no state dict inside; the message names the file and what to do.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {p}. Train first (python -m monai.bundle run training --config_file "
            "bundles/ulite/configs/train.json) or pass the path of a trained model.pt."
        )
    raw = p.read_bytes()
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated file, not a torch file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot load checkpoint {p} with weights_only=True ({type(e).__name__}: {first}). "
            "Save a plain state dict (torch.save(net.state_dict(), path)) or retrain."
        ) from e
    return unwrap_state_dict(obj, str(p), expected_keys), hashlib.sha256(raw).hexdigest()[:n]


def load_weights(net: torch.nn.Module, path: str | os.PathLike, strict: bool = True) -> str:
    """Load the checkpoint at ``path`` into ``net``; returns ``"sha256:<digest>"`` of the file.

    Raises:
        FileNotFoundError, CheckpointError: see :func:`read_checkpoint`; also when the weights do not fit ``net``
            (the message counts the mismatching entries and shows the first).
    """
    state, digest = read_checkpoint(path, expected_keys=net.state_dict().keys())
    try:
        net.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        detail = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        first = detail[1] if len(detail) > 1 else detail[0]
        raise CheckpointError(
            f"checkpoint {path} does not fit the bundle's network_def ({max(1, len(detail) - 1)} mismatching "
            f"entries, first: {first[:300]}); check the config overrides (features, channels, spatial_dims) the "
            "checkpoint was trained with."
        ) from e
    return "sha256:" + digest
