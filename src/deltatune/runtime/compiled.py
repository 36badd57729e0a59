"""A compiled decode step over a static KV cache: one row at a time, its adapter fixed, for single streams.

Why: decoding one row eagerly on a CPU spends each token in ~210 matrix-vector products that read the weights
at a third of what the memory delivers, plus the Python and dispatch around 30 layers. Inductor with freezing
packs the weights and writes its own matrix-vector kernels (max-autotune's C++ templates), one compiled graph
per token: ~3x the eager rate on SmolLM2 here, the adapter included (bench/README §28). That needs
- shapes that never change: a transformers `StaticCache` of a fixed length, the smallest of `LENGTHS` that
  holds the prompt and its token limit; each length compiles once and keeps its cache for the next request;
- weights that never change: freezing makes the base and the adapter constants of the compiled step (a LoRA
  update folded into its layer's weight, W + s B A, once at compile time: `LoraLinear._inference_forward`). A
  decoder is a snapshot: build it once the model and adapter are loaded (nothing trainable), and a new one
  after changing them; a decoder whose weights were changed or replaced since (by version counter and
  storage) refuses to decode (`StaleCompiledStep`) rather than mix its constants with the live weights.
Dynamo's guards are cut to the inputs' tensor checks: checking the model's modules before every call cost 2.5
ms a token on the base and 4.8 with an adapter's 210 wrappers (10-19% of a compiled token), and what they
would check the decoder keeps itself (a code object per step, the adapter set around every call, the weights'
versions compared before every request). The prompt runs eagerly (its length varies); only the per-token
step is compiled. A compile that fails falls back to the same step run eagerly over the same static cache,
once and with a warning, so answers stay the eager model's. Tokens are chosen by the engine's own code (`sampling.next_tokens`); processors from the
model's generation_config are not applied, as in `runtime.decode`.
"""

from __future__ import annotations

import inspect
import itertools
import types
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from ..core.adapters import activated, all_wrappers
from ..core.capabilities import Capability, adapter_refusal
from ..core.errors import DeltatuneError, DeltatuneWarning
from ..core.head_input import contiguous_head_input
from ..core.kv_cache import cache_argument
from ..core.threads import oversubscription
from ..methods.virtual_tokens import text_config
from .decode import NonFiniteOutput
from .decode_attention import attending_in_float32, decode_kv_dtype, with_float32_layers
from .prefill import model_device
from .sampling import Completion, Sampler, Sampling, check_vocabulary, next_tokens, scored

LENGTHS = (256, 512, 1024, 2048, 4096)  # static cache lengths, each compiled at its first use
# freezing makes the weights constants (what the C++ GEMM templates need to pack them); max_autotune picks
# those templates over ATen's kernels where they are faster
COMPILE_OPTIONS = {"freezing": True, "max_autotune": True}

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CompiledDecodingUnsupported(DeltatuneError, ValueError):
    """This model, adapter or request cannot decode through a static cache; use the eager engine."""


class StaleCompiledStep(DeltatuneError, RuntimeError):
    """The model's weights changed after its decode step was compiled with them as constants."""


class CompiledDecoder:
    """Single-row decoding of `model` with adapter `adapter` (None: the base) by a compiled step.

    `lengths`: the static cache lengths to choose from (ascending; capped at the model's
    max_position_embeddings). `compile=False` runs the same static-cache step eagerly (a reference, and what
    a failed compile falls back to). Not thread-safe: one thread decodes at a time. The frozen constants of a
    compiled step stay loaded for the rest of the process (inductor keeps the modules it generates, and their
    constants, in sys.modules): build one decoder per model and adapter and keep it, not one per request.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: str | None = None,
        *,
        lengths: Sequence[int] = LENGTHS,
        compile: bool = True,
    ) -> None:
        if model.training:
            raise CompiledDecodingUnsupported("decoding is for inference; call model.eval() first")
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        if compile and trainable:
            raise CompiledDecodingUnsupported(
                f"{len(trainable)} parameters are trainable ({trainable[0]}, ...): a compiled decode step holds the "
                "weights as constants, which training would leave behind; call model.requires_grad_(False) "
                "first, or decode eagerly"
            )
        if not getattr(model, "_can_compile_fullgraph", False):
            raise CompiledDecodingUnsupported(
                f"{type(model).__name__} does not support transformers' static KV cache, which a compiled "
                "decode step needs; decode it eagerly (drop --compile)"
            )
        refusal = adapter is not None and adapter_refusal(model, adapter, Capability.STATIC_CACHE)
        if refusal:
            raise CompiledDecodingUnsupported(refusal)
        crowded = compile and oversubscription(torch.get_num_threads())
        if crowded:  # its hundreds of parallel regions a token each wait for every thread (bench/README §31)
            warnings.warn(
                f"{crowded}. A compiled decode step suffers most: beside two busy processes on 2 cores it ran "
                "8-13 tokens/s with 2 threads against 23-26 with 1 (41-43 and 36 on idle cores)",
                DeltatuneWarning,
                stacklevel=2,
            )
        self._text_config = text_config(model)  # the decoder's, in a multimodal model
        self.lengths = _usable_lengths(self._text_config, lengths)
        self.model = model
        self.adapter = adapter
        self.device = model_device(model)
        self.compile = compile
        self.fell_back: str | None = None  # why compiling failed, once it has (every step is eager since)
        self._wrappers = [w for _, w in all_wrappers(model)]
        self._weights = _weights_state(model)
        self._caches: dict[int, object] = {}
        # a half-precision model on a CPU attends in float32 over a float32 static cache (runtime.decode_attention)
        self._float32_kv = decode_kv_dtype(model) is not None
        self._float32_lengths: set[int] = set()  # the static caches that hold float32 keys and values
        self._steps: dict[int, Step] = {}
        self._compiled: set[int] = set()  # lengths whose compiled step has run once
        self._cache_name = cache_argument(model)
        self._last_only = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        )

    @torch.no_grad()
    def generate(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None,
        sampling: Sampling | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Completion:
        """The completion of one prompt (token ids): up to `max_new_tokens` tokens, ending early at an
        end-of-sequence token; `on_token` sees each token as it comes (streaming). Raises `NonFiniteOutput`
        when the scores hold NaN or +inf."""
        if not prompt:
            raise ValueError("a prompt has no tokens; it needs at least one")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        sampling = sampling or Sampling()
        check_vocabulary(sampling, self.model)
        weights = _weights_state(self.model)
        if weights != self._weights and self._compiled:
            raise StaleCompiledStep(
                "the model's weights changed after this decoder compiled its step, which holds the old ones as "
                "constants: build a new CompiledDecoder"
            )
        self._weights = weights  # (nothing compiled yet, or the eager step: it reads the live weights)
        length = self._length_for(len(prompt) + max_new_tokens)
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        sampler = Sampler(sampling)
        tokens: list[int] = []
        logprobs = [] if sampler.sampling.logprobs is not None else None
        cache = self._cache(length)
        with activated(self._wrappers, self.adapter), self._attention(length):
            logits = self._prefill(prompt, cache)
            position = len(prompt)
            while True:
                (token,), broken = next_tokens(logits, [sampler], [tokens])
                if broken:
                    raise NonFiniteOutput.of(broken[0], self.adapter)
                if token in eos:
                    return Completion(tokens, "stop", len(prompt), logprobs, token)
                tokens.append(token)
                if on_token is not None:
                    on_token(token)
                if logprobs is not None:
                    logprobs.append(scored(logits, [sampler], [token])[0])
                if len(tokens) >= max_new_tokens:
                    return Completion(tokens, "length", len(prompt), logprobs)
                logits = self._step(length, token, position)
                position += 1

    # ---- the static cache and its steps -----------------------------------------------------------------------
    def _length_for(self, needed: int) -> int:
        for length in self.lengths:
            if length >= needed:
                return length
        raise CompiledDecodingUnsupported(
            f"the prompt and max_new_tokens need {needed} positions; the longest static cache here holds "
            f"{self.lengths[-1]}: shorten the prompt or max_new_tokens, or decode eagerly (drop --compile)"
        )

    def _cache(self, length: int):
        from transformers import StaticCache

        cache = self._caches.get(length)
        if cache is None:
            cache = self._caches[length] = StaticCache(config=self._text_config, max_cache_len=length)
            if self._float32_kv and with_float32_layers(cache):
                self._float32_lengths.add(length)
        else:
            cache.reset()  # in place: the compiled step keeps reading these tensors
        return cache

    def _attention(self, length: int) -> AbstractContextManager:
        """float32 attention around the prompt and every step over a float32 static cache, outside the
        compiled step (whose graph is traced with it)."""
        return attending_in_float32(self.model) if length in self._float32_lengths else nullcontext()

    def _forward(self, cache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Last-position logits (1, vocab) of `ids` (1, n) at `positions` (n,), written into `cache`."""
        out = self.model(
            input_ids=ids,
            position_ids=positions.unsqueeze(0),
            cache_position=positions,
            use_cache=True,
            **{self._cache_name: cache},
            **self._last_only,
        )
        return out.logits[:, -1]

    def _prefill(self, prompt: Sequence[int], cache) -> torch.Tensor:
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
        positions = torch.arange(len(prompt), device=self.device)
        with contiguous_head_input(self.model):  # (the compiled step's head input is row-major already)
            return self._forward(cache, ids, positions).float()

    def _step(self, length: int, token: int, position: int) -> torch.Tensor:
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        at = torch.tensor([position], dtype=torch.long, device=self.device)
        step = self._steps.get(length) or self._built_step(length)
        if length in self._compiled or not self.compile or self.fell_back is not None:
            return step(ids, at).float()
        try:  # the first call compiles
            logits = step(ids, at)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager step gives the answer
            self._fall_back(exc)
            return self._built_step(length)(ids, at).float()  # rewrites the same cache column
        self._compiled.add(length)
        return logits.float()

    def _built_step(self, length: int) -> Step:
        cache = self._caches[length]

        def step(ids: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
            return self._forward(cache, ids, at)

        if self.compile and self.fell_back is None:
            guards = {"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}
            step = _under_options(
                torch.compile(_own_code(step), dynamic=False, fullgraph=True, options=guards)
            )
        self._steps[length] = step
        return step

    def _fall_back(self, exc: Exception) -> None:
        lines = str(exc).strip().splitlines()
        self.fell_back = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        self._steps = {}  # rebuilt eager
        warnings.warn(
            f"compiling the decode step failed ({self.fell_back}); decoding eagerly from now on (the same "
            "answers, at the eager speed)",
            RuntimeWarning,
            stacklevel=4,
        )


def _under_options(compiled: Step) -> Step:
    """`compiled`, every call (and so every trace and recompile) under COMPILE_OPTIONS. Not `torch.compile`'s
    `options`: those reach inductor only, after dynamo has already lifted the weights into graph inputs, which
    freezing then cannot fold (measured: 15 tokens/s instead of 38 on SmolLM2)."""

    def step(ids: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        with torch._inductor.config.patch(COMPILE_OPTIONS):
            return compiled(ids, at)

    return step


_codes = itertools.count()


def _own_code(fn: Step) -> Step:
    """`fn` with a code object of its own. Dynamo keeps compiled graphs per code object and reuses one whose
    guards pass, and the guards do not cover frozen constants: a step compiled for another decoder of the same
    model (another adapter state, weights since changed) or another cache length must never be taken."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_codes)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _weights_state(model: nn.Module) -> list[tuple[int, int, int]]:
    """Each parameter's identity, storage and version: what changes when weights are loaded, merged, swapped or
    edited in place (trainable parameters, which fused optimizers write without a version bump, are refused)."""
    return [(id(p), p.data_ptr(), p._version) for p in model.parameters()]


def _usable_lengths(config: Any, lengths: Sequence[int]) -> tuple[int, ...]:
    """`lengths` sorted, those beyond the (text) config's positions replaced by its last position count."""
    if not lengths or any(n < 2 for n in lengths):
        raise ValueError(f"static cache lengths must be at least 2 each; got {list(lengths)}")
    limit = getattr(config, "max_position_embeddings", None)
    usable = sorted({min(n, limit) if limit else n for n in lengths})
    return tuple(usable)
