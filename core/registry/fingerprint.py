"""SHA-256 fingerprints of training data, recorded with every registered model version."""

from __future__ import annotations

import hashlib
from os import PathLike
from typing import Any

import numpy as np
import torch

__all__ = ["fingerprint_file", "fingerprint_arrays"]

_CHUNK = 1 << 20


def fingerprint_file(path: str | PathLike[str]) -> str:
    """``"sha256:<hex>"`` of a file's bytes (streamed, so large files are fine)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def fingerprint_arrays(*arrays: Any) -> str:
    """``"sha256:<hex>"`` over the dtype, shape and bytes of each array (tensors or array-likes), in order."""
    if not arrays:
        raise ValueError("fingerprint_arrays needs at least one array")
    digest = hashlib.sha256()
    for arr in arrays:
        dtype, shape, data = _array_bytes(arr)  # torch and numpy spell dtypes alike: same data, same hash
        # dtype and shape go in too: the same bytes read as another layout are other data.
        digest.update(f"{dtype}|{tuple(shape)}|".encode())
        digest.update(data)
    return f"sha256:{digest.hexdigest()}"


def _array_bytes(arr: Any) -> tuple[str, tuple[int, ...], bytes]:
    if isinstance(arr, torch.Tensor):
        t = arr.detach().cpu().contiguous()
        # view as bytes: works for dtypes numpy lacks (bfloat16).
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return str(t.dtype).removeprefix("torch."), tuple(t.shape), raw
    a = np.ascontiguousarray(np.asarray(arr))
    if a.dtype == object:
        raise ValueError("fingerprint_arrays cannot hash object arrays; pass numeric arrays or tensors")
    return str(a.dtype), a.shape, a.tobytes()
