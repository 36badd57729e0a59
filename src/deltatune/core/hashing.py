"""Content hashes of tensors (exact bytes, shape and dtype included) and of files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def tensor_sha256(tensor: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def sha256_file(*paths: Path) -> str:
    """One digest over the bytes of all `paths`, in order, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
