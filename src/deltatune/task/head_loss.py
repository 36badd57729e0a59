"""A causal LM's cross-entropy straight from its last hidden states: the output head and the loss in chunks of
rows, the gradient computed in the same pass, so the (tokens x vocabulary) logits never exist whole.

Why: with a 49k vocabulary the logits of a 4 x 128 batch are 96 MiB in fp32, and the usual path makes four
such tensors (the logits, their log-softmax, and two gradients of that size in backward), each a fresh
allocation written once and read once. Here each chunk's logits are made, turned into the chunk's loss and its
gradient (softmax minus the one-hot target) in place, and multiplied back through the head, while they are
still in cache; what is kept for backward is the gradient of the hidden states, (tokens x hidden). The
arithmetic is the plain path's (the head forward and its input gradient); the loss and gradients are equal up
to float summation order (tests/test_head_loss.py).

Only rows that carry a label go through the head. The model runs with its head given an empty input (a
forward pre-hook), which works through DDP's wrapper and any hook a method put on the model. Whether a model's
logits are just its head applied to the hidden states (no soft-capping or scaling after the head, no positions
added or removed) is checked once per model and head, on a few tokens; where they are not, or the head is not
a plain `nn.Linear` (an adapter on the head, a quantized head), or its weight is sharded (FSDP), or virtual
tokens rewrite the model's inputs, the caller takes the plain path.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..core.input_hooks import rewrites_inputs
from ..core.modes import eval_mode

# fp32 logits per chunk. Each chunk reads the whole head weight twice (forward and input gradient), so on a CPU
# small chunks are slow: for SmolLM2 (a 113 MiB head) the loss of 508 rows took 443 ms in chunks of 341 rows
# (log-softmax, the first version), 374 in one chunk, transformers' path 451 (bench/README §13); a 64-row
# prototype took 558.
CHUNK_BYTES = 128 * 2**20


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight^T + bias, targets). Gradients are made in forward (when
    `with_grad`) and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, with_grad: bool):
        rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        need_hidden, need_weight = with_grad and hidden.requires_grad, with_grad and weight.requires_grad
        need_bias = with_grad and bias is not None and bias.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        buffer = hidden.new_empty(min(rows, hidden.shape[0]), weight.shape[0])  # reused by every chunk
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows, None]
            out = buffer[: h.shape[0]]
            logits = (
                torch.mm(h, weight.t(), out=out)
                if bias is None
                else torch.addmm(bias, h, weight.t(), out=out)
            )
            logits = logits.float()  # the same tensor in fp32; under autocast the softmax runs in fp32
            # loss = logsumexp(logits) - logits[target], the softmax made in place: one chunk-sized tensor
            picked = logits.gather(1, t)
            top = logits.amax(dim=1, keepdim=True)
            sums = logits.sub_(top).exp_().sum(dim=1, keepdim=True)
            total += (top + sums.log() - picked).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            grad_logits = logits.div_(sums)  # softmax - one_hot(target): d(loss)/d(logits)
            grad_logits.scatter_add_(1, t, grad_logits.new_full(t.shape, -1.0))
            if need_bias:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(hidden.dtype)
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[start : start + rows])
            if need_weight:
                grad_weight.addmm_(grad_logits.t().float(), h.float())
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        scaled = [
            None if g is None else (g * grad_total).to(dtype)
            for g, dtype in zip(ctx.grads, ctx.dtypes, strict=True)
        ]
        return scaled[0], scaled[1], scaled[2], None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """Summed cross-entropy of `F.linear(hidden, weight, bias)` (rows, vocabulary) against `targets` (rows,),
    without the logits of all rows at once. Under autocast the head's product runs in autocast's dtype and the
    softmax in fp32, as `F.cross_entropy(linear(...).float(), ...)` would."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with_grad = torch.is_grad_enabled()
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, with_grad)


class _HeadInput:
    hidden: torch.Tensor | None = None


@contextlib.contextmanager
def head_input(head: nn.Module, *, skip: bool = True) -> Iterator[_HeadInput]:
    """Record the hidden states `head` is called with; `skip`: give it none of them, so it computes nothing."""
    seen = _HeadInput()

    def record(module: nn.Module, args: tuple) -> tuple | None:
        seen.hidden = args[0]
        return (args[0].narrow(-2, 0, 0), *args[1:]) if skip else None

    handle = head.register_forward_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


_CHECKED: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, bool]] = weakref.WeakKeyDictionary()


def fusable_head(model: nn.Module, input_ids: torch.Tensor) -> nn.Linear | None:
    """The output head of `model` (unwrapped from DDP) when its logits are that head applied to the hidden
    states the head receives, so the loss can be taken from those states; None when the plain path is needed.
    The check runs once per model and head, on the first few tokens of `input_ids`."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not nn.Linear or type(head.weight) is not nn.Parameter:  # adapted, quantized or sharded
        return None
    if rewrites_inputs(inner):  # virtual tokens move positions
        return None
    known = _CHECKED.get(inner)
    if known is None or known[0]() is not head:
        known = (weakref.ref(head), _logits_are_head_of_hidden(inner, head, input_ids[:1, :8]))
        _CHECKED[inner] = known
    return head if known[1] else None


@torch.no_grad()
def _logits_are_head_of_hidden(model: nn.Module, head: nn.Linear, ids: torch.Tensor) -> bool:
    """In eval mode: no dropout, so no random numbers drawn that a resumed run would not draw too."""
    with eval_mode(model), head_input(head, skip=False) as seen:
        logits = getattr(model(input_ids=ids), "logits", None)
    if logits is None or seen.hidden is None or logits.shape[:-1] != seen.hidden.shape[:-1]:
        return False
    return torch.equal(logits, head(seen.hidden).to(logits.dtype))


def head_loss(
    model: nn.Module,
    head: nn.Linear,
    ids: torch.Tensor,
    targets: torch.Tensor,
    trained: torch.Tensor,
    extra: dict[str, Any],
) -> torch.Tensor:
    """Summed next-token loss of `model` on `ids` (rows, T): `targets[:, t]` is predicted from position t, and
    counts where `trained` (rows, T - 1). The model runs with its head skipped."""
    with head_input(head) as seen:
        model(input_ids=ids, **extra)
    if seen.hidden is None or seen.hidden.shape[:2] != ids.shape:
        raise RuntimeError(
            f"the output head saw hidden states of shape {None if seen.hidden is None else tuple(seen.hidden.shape)}"
            f" for input ids {tuple(ids.shape)}; the fused loss needs one state per input position"
        )
    hidden = seen.hidden[:, :-1][trained]
    return linear_cross_entropy(hidden, head.weight, head.bias, targets[trained])
