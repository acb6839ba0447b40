"""Checkpoint reading for the Label app: weights only, plain or wrapped state dicts."""

from __future__ import annotations

import hashlib
import io

import torch

__all__ = ["file_digest", "load_state_dict", "read_checkpoint"]


def file_digest(path: str, n: int = 16) -> str:
    """First ``n`` hex digits of the file's SHA-256 (reported with each result, so clients see which weights ran)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def read_checkpoint(path: str, n: int = 16) -> tuple[dict[str, torch.Tensor], str]:
    """:func:`load_state_dict` and the first ``n`` hex digits of the SHA-256 of the very bytes it loaded."""
    with open(path, "rb") as f:
        raw = f.read()
    return load_state_dict(path, raw), hashlib.sha256(raw).hexdigest()[:n]


def load_state_dict(path: str, raw: bytes | None = None) -> dict[str, torch.Tensor]:
    """Weights from a checkpoint: a plain state dict or ``{"model": state_dict, ...}`` (the bundle's CheckpointSaver).

    Loaded with ``weights_only=True``: a checkpoint that needs arbitrary code to unpickle is refused.

    Args:
        path: the checkpoint file (named in errors).
        raw: its bytes, when already read.

    Raises:
        ValueError: the file cannot be loaded weights-only, or holds no state dict; the message says what to do.
    """
    try:
        ckpt = torch.load(io.BytesIO(raw) if raw is not None else path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated file, not a torch file
        raise ValueError(
            f"Cannot load checkpoint {path} with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Save a plain state dict (torch.save(net.state_dict(), path)) or retrain."
        ) from e
    for key in ("model", "network", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path} holds no state dict (expected a mapping of parameter names to tensors).")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}
