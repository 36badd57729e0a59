"""FSDP2 for `training.distributed: fsdp`: PyTorch's own `fully_shard`, one shard unit per decoder block.

Each rank holds 1/world of every weight and gathers a block's weights only while that block runs, so a model
that fits no single device trains. What the rest of the trainer reads stays whole: the trainable state (adapter
weights and optimizer moments) is gathered into ordinary full tensors for saving, so an adapter or checkpoint
written under FSDP is the same file a single process writes, and a checkpoint resumes on any number of ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from ..core.adapters import all_wrappers
from ..core.errors import DeltatuneError
from ..core.layer import AdapterLayer
from ..task.config import FsdpSpec

MIXED_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FsdpError(DeltatuneError, RuntimeError):
    """The model cannot be sharded as asked."""


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the classes a transformers model names as never to be split
    across devices (`_no_split_modules`, e.g. LlamaDecoderLayer), else the children of its longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        raise FsdpError(
            f"{type(model).__name__} has no repeated blocks to shard (no `_no_split_modules` and no ModuleList); "
            "use training.distributed: ddp"
        )
    return list(max(lists, key=len))


def embedding_units(model: nn.Module) -> list[nn.Module]:
    """The input and output embeddings, to be sharded as units of their own: each is as large as a block or
    larger, and left to the root unit they would stay gathered for the whole forward. Empty when they cannot
    be: tied embeddings (one weight, which only the root can hold), and an embedding inside an adapter wrapper
    (prompt tuning, LoRA on embeddings), whose forward reads the weight without calling the embedding module,
    so a unit of its own would never be gathered."""
    embeddings = [_call(model, "get_input_embeddings"), _call(model, "get_output_embeddings")]
    weights = [getattr(e, "weight", None) for e in embeddings]
    if any(w is None for w in weights) or weights[0] is weights[1]:
        return []
    wrapped = {id(m) for _, wrapper in all_wrappers(model) for m in wrapper.modules()}
    return [e for e in embeddings if id(e) not in wrapped]


def _call(model: nn.Module, getter: str) -> nn.Module | None:
    get = getattr(model, getter, None)
    return get() if callable(get) else None


def shard_model(model: nn.Module, spec: FsdpSpec, device: torch.device, precision: str) -> nn.Module:
    """Shard `model` in place: each decoder block, then each separate embedding, then the root for the rest;
    the shards land on `device` unit by unit, so it never holds the whole model (call it before moving the
    model). On CUDA, bf16/fp16 precision becomes FSDP's mixed-precision policy (gradients reduced in fp32); on
    CPU autocast alone does it."""
    _fingerprint_before_sharding(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": spec.reshard_after_forward}
    if spec.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    if device.type == "cuda" and precision in MIXED_PRECISION:
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=MIXED_PRECISION[precision], reduce_dtype=torch.float32
        )
    for block in decoder_blocks(model):
        fully_shard(block, **options)
    for embedding in embedding_units(model):
        fully_shard(embedding, **options)
        if embedding is _call(model, "get_input_embeddings") and not _trains(embedding):
            embedding.set_unshard_in_backward(False)  # a lookup table: backward never reads the frozen weight
    fully_shard(model, **options)
    if device.type == "cpu":
        _free_each_gather_after_use(model)
    return model


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _free_each_gather_after_use(model: nn.Module) -> None:
    """On CPU, free a unit's all-gather buffer as soon as its weights are copied out of it.

    In forward, FSDP keeps each unit's buffer (as large as the unit) until the next unit's gather, so that on
    CUDA a copy stream can overlap the two; a CPU has no streams, and the buffer only raised the per-rank peak
    (by a block, 176 MiB at 1.1B; bench/README §7). Gathering with `async_op=True` frees it at once."""
    set_async = getattr(model, "_set_unshard_async_op", None)
    if set_async is not None:  # private in torch 2.13; without it FSDP keeps its default
        set_async(True)


def _fingerprint_before_sharding(model: nn.Module) -> None:
    """An adapter's provenance hashes the base weights it targets; after sharding a rank holds only a slice of
    them, so the hash is taken now, while every rank holds them whole (each layer caches it)."""
    for _, wrapper in all_wrappers(model):
        if isinstance(wrapper, AdapterLayer):
            wrapper.base_digest()


_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def gather_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The full trainable weights on rank 0's CPU (empty elsewhere). A collective: every rank calls it."""
    weights = get_model_state_dict(model, options=_GATHER)
    return {name: weights[name] for name in names} if weights else {}


def gather_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str]
) -> dict[str, Any]:
    """The full optimizer state on rank 0 (empty elsewhere), in `Optimizer.state_dict()`'s own layout (keyed
    by index, not name), as a single process writes it. A collective. `names`: the optimizer's parameters in
    order."""
    by_name = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    if not by_name or not by_name.get("state"):
        return {}
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: slots for name, slots in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }


def load_trainable(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    names: list[str],
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Scatter full tensors (every rank read the same checkpoint) into this rank's shards."""
    full = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=full)
    by_name = {
        "state": {names[int(i)]: slots for i, slots in optimizer_state["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in optimizer_state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=full)


@contextlib.contextmanager
def whole_parameters(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """On rank 0, inside this block, the named parameters are the gathered full tensors instead of shards, so
    code that reads a model (save_adapter, save_pretrained) writes the whole adapter. No forward may run."""
    swapped = []
    for name, tensor in weights.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        swapped.append((owner, attr, owner._parameters[attr]))
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=True)
    try:
        yield
    finally:
        for owner, attr, shard in swapped:
            owner._parameters[attr] = shard
