"""Resumable training checkpoints: trainable weights, optimizer, scheduler, RNG and data position.

Tensors go through safetensors and everything else through JSON, so resuming never unpickles a file. A
checkpoint is written into a hidden staging folder and renamed into place, so a kill at any moment leaves
either the previous checkpoints or a complete new one, never a half-written `step-*` folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.atomic import staged_folder
from ..core.errors import DeltatuneError
from ..core.hashing import sha256_file

PREFIX = "step-"


class CheckpointError(DeltatuneError, RuntimeError):
    """A checkpoint is missing, corrupt or does not fit the current run."""


def fault_point(name: str, step: int) -> None:
    """Crash-test hook: DELTATUNE_FAULT=name:step makes this process SIGKILL itself at that point."""
    if os.environ.get("DELTATUNE_FAULT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    skeleton: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, slots in state["state"].items():
        entry = {}
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                name = f"state.{index}.{key}"
                tensors[name] = value.detach().to("cpu").contiguous()
                entry[key] = {"__tensor__": name}
            else:
                entry[key] = value
        skeleton["state"][str(index)] = entry
    return tensors, skeleton


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], skeleton: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for index, slots in skeleton["state"].items():
        state[int(index)] = {
            key: tensors[value["__tensor__"]] if isinstance(value, dict) and "__tensor__" in value else value
            for key, value in slots.items()
        }
    return {"state": state, "param_groups": skeleton["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], list[Any]]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    return tensors, list(random.getstate())


def restore_rng(tensors: dict[str, torch.Tensor], python_state: list[Any]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    root: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` from full (unsharded) tensors: the trainable weights by parameter name and the
    optimizer state as `Optimizer.state_dict()` lays it out."""
    final = root / f"{PREFIX}{step:08d}"
    with staged_folder(final, whole=True) as staging:
        optim_tensors, optim_skeleton = _flatten_optimizer(optimizer_state)
        rng_tensors, python_rng = rng_state()
        weights = {n: t.detach().to("cpu").contiguous() for n, t in trainable.items()}
        save_file(weights, staging / "trainable.safetensors")
        fault_point("checkpoint", step)  # after one file, before the rest: the worst moment to die
        save_file({**optim_tensors, **rng_tensors}, staging / "state.safetensors")
        meta = {
            "step": step,
            "optimizer": optim_skeleton,
            "scheduler": scheduler_state,
            "python_rng": python_rng,
            "trainer": trainer_state,
            "sha256": {f: sha256_file(staging / f) for f in ("trainable.safetensors", "state.safetensors")},
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_staging(root: Path) -> None:
    """Hidden staging folders left by a process killed mid-write; never read, safe to delete."""
    if root.is_dir():
        for stale in root.glob(f".{PREFIX}*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


@dataclass
class Checkpoint:
    """A checkpoint as full tensors, whatever number of ranks wrote it."""

    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    trainer_state: dict[str, Any]  # step, data position, best metric, ...
    rng: tuple[dict[str, torch.Tensor], list[Any]]

    def restore_rng(self) -> None:
        restore_rng(*self.rng)


def read_checkpoint(folder: Path, trainable: set[str]) -> Checkpoint:
    """Read and verify a checkpoint (hashes, and that it holds exactly the `trainable` parameter names)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{folder} is not a complete checkpoint ({exc}); delete it to resume from the one before"
        ) from None
    for name, digest in meta["sha256"].items():
        if sha256_file(folder / name) != digest:
            raise CheckpointError(f"{folder / name} does not match its recorded sha256; the file is corrupt")
    weights = load_file(folder / "trainable.safetensors")
    if set(weights) != trainable:
        diff = sorted(set(weights) ^ trainable)[:5]
        raise CheckpointError(
            f"{folder} was written for a different set of trainable parameters (differing: {diff}); "
            "resume with the same config the run started with"
        )
    state = load_file(folder / "state.safetensors")
    return Checkpoint(
        weights=weights,
        optimizer_state=_unflatten_optimizer(state, meta["optimizer"]),
        scheduler_state=meta["scheduler"],
        trainer_state=meta["trainer"],
        rng=(state, meta["python_rng"]),
    )


def load_into(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    """Copy a checkpoint's weights and optimizer state into an unsharded model (one process, or DDP)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in checkpoint.weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(checkpoint.optimizer_state)
