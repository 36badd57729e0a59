"""The compiled decode step (runtime.compiled): a static KV cache and torch.compile with frozen weights give
each row the tokens transformers' `generate` gives it, with its adapter inside the graph; a compile that fails
falls back to the eager step once, saying so; what cannot decode through a static cache is refused."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import build_llama
from test_decode import _alone, bf16_with_float32_adapters
from test_runtime import _with_adapters

import deltatune as dt
from deltatune.runtime import compiled as compiled_module
from deltatune.runtime.compiled import CompiledDecoder, CompiledDecodingUnsupported, StaleCompiledStep
from deltatune.runtime.decode import NonFiniteOutput
from deltatune.runtime.sampling import Sampling

PROMPTS = [[5, 17, 3, 44, 9], [71, 2, 2, 30, 8, 61, 19]]


def _decode(decoder, prompt, limit, **kwargs):
    return decoder.generate(prompt, max_new_tokens=limit, eos_token_id=kwargs.pop("eos", None), **kwargs)


def _zero_b(model, adapter):
    """The adapter's B factors zeroed in place: its update vanishes, the base remains."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(f"lora_B.{adapter}"):
                module.weight.zero_()


@pytest.mark.slow
def test_compiled_rows_equal_transformers_generate_and_a_decoder_is_a_snapshot():
    """All-linear LoRA inside the frozen graph, two requests through one compiled step and its cache."""
    model = _with_adapters().requires_grad_(False)
    decoder = CompiledDecoder(model, "b", lengths=(32,))
    for prompt, limit in ((PROMPTS[0], 8), (PROMPTS[1], 20)):
        done = _decode(decoder, prompt, limit)
        reference = _alone(model, prompt, "b", limit)
        assert done.tokens == reference.tokens and done.finish_reason == "length"
        assert done.prompt_tokens == len(prompt)
    assert decoder.fell_back is None and decoder._compiled == {32}
    # the weights are constants of the compiled step: once they change, the decoder refuses, and a new one
    # compiles its own step (none of the first decoder's graphs, whose guards would pass, is taken)
    _zero_b(model, "b")
    with pytest.raises(StaleCompiledStep, match="build a new CompiledDecoder"):
        _decode(decoder, PROMPTS[1], 20)
    fresh = CompiledDecoder(model, "b", lengths=(32,))
    assert _decode(fresh, PROMPTS[1], 20).tokens == _alone(model, PROMPTS[1], None, 20).tokens
    assert fresh._compiled == {32}


@pytest.mark.parametrize("adapter", [None, "a", "c"])
def test_the_static_cache_step_equals_generate_for_each_adapter_and_length(adapter):
    """The same step uncompiled (what a failed compile falls back to): the base with adapters loaded beside
    it, and each adapter; requests in the shorter cache, the longer one, then the shorter again."""
    model = _with_adapters().requires_grad_(False)
    decoder = CompiledDecoder(model, adapter, lengths=(16, 32), compile=False)
    for prompt, limit in ((PROMPTS[0], 9), (PROMPTS[1], 20), (PROMPTS[1], 9)):
        assert _decode(decoder, prompt, limit).tokens == _alone(model, prompt, adapter, limit).tokens
    assert sorted(decoder._caches) == [16, 32]
    if adapter is not None:  # uncompiled, the step reads the live weights: a change is simply followed
        _zero_b(model, adapter)
        assert _decode(decoder, PROMPTS[0], 9).tokens == _alone(model, PROMPTS[0], None, 9).tokens


def test_a_row_ends_at_end_of_sequence_and_samples_as_the_engine_does():
    model = _with_adapters().requires_grad_(False)
    decoder = CompiledDecoder(model, "b", lengths=(32,), compile=False)
    reference = _alone(model, PROMPTS[0], "b", 12).tokens
    first_new = next(i for i in range(1, 12) if reference[i] not in reference[:i])  # a token not seen before
    done = _decode(decoder, PROMPTS[0], 12, eos=reference[first_new])
    assert done.finish_reason == "stop" and done.stop_token == reference[first_new]
    assert done.tokens == reference[:first_new]
    sampling = Sampling(temperature=1.0, seed=7, logprobs=0)
    (engine,) = dt.runtime.generate(
        model, [PROMPTS[1]], ["b"], max_new_tokens=10, pad_token_id=0, eos_token_id=None, sampling=sampling
    )
    sampled = _decode(decoder, PROMPTS[1], 10, sampling=sampling)
    assert sampled.tokens == engine.tokens and sampled.tokens != _alone(model, PROMPTS[1], "b", 10).tokens
    torch.testing.assert_close(
        [c.logprob for c in sampled.logprobs], [c.logprob for c in engine.logprobs], rtol=0, atol=1e-5
    )


def test_a_failed_compile_falls_back_to_the_eager_step_once_and_says_so(monkeypatch):
    model = _with_adapters().requires_grad_(False)
    compiles = []

    def broken_compile(fn, **options):
        compiles.append(options)

        def run(*args):
            raise RuntimeError("the backend exploded\nlong traceback")

        return run

    monkeypatch.setattr(compiled_module.torch, "compile", broken_compile)
    decoder = CompiledDecoder(model, "b", lengths=(16, 32))
    with pytest.warns(RuntimeWarning, match=r"compiling the decode step failed \(RuntimeError: the backend "):
        done = _decode(decoder, PROMPTS[0], 8)
    assert done.tokens == _alone(model, PROMPTS[0], "b", 8).tokens
    assert decoder.fell_back == "RuntimeError: the backend exploded"
    guards = {"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}
    assert compiles == [{"dynamic": False, "fullgraph": True, "options": guards}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second try, for any length
        assert _decode(decoder, PROMPTS[1], 20).tokens == _alone(model, PROMPTS[1], "b", 20).tokens
    assert len(compiles) == 1


def test_non_finite_scores_are_an_error_naming_the_adapter():
    model = _with_adapters().requires_grad_(False)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("lora_B.a"):
                module.weight.fill_(float("nan"))
    decoder = CompiledDecoder(model, "a", lengths=(16,), compile=False)
    with pytest.raises(NonFiniteOutput, match="adapter 'a' are NaN"):
        _decode(decoder, PROMPTS[0], 4)


def test_what_a_static_cache_cannot_take_is_refused():
    model = _with_adapters()
    dt.inject(model, dt.PromptTuningConfig(num_virtual_tokens=3), adapter_name="prompt")
    model.requires_grad_(False)
    with pytest.raises(CompiledDecodingUnsupported, match="virtual tokens take positions before the prompt"):
        CompiledDecoder(model.eval(), "prompt")
    with pytest.raises(CompiledDecodingUnsupported, match=r"no adapter named 'z'; this model has \['a'"):
        CompiledDecoder(model, "z")
    decoder = CompiledDecoder(model, "a", lengths=(16, 32), compile=False)
    with pytest.raises(CompiledDecodingUnsupported, match="need 33 positions; the longest static cache here"):
        _decode(decoder, PROMPTS[0], 28)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        _decode(decoder, PROMPTS[0], 0)
    plain = build_llama().requires_grad_(False)
    plain._can_compile_fullgraph = False
    with pytest.raises(CompiledDecodingUnsupported, match="does not support transformers' static KV cache"):
        CompiledDecoder(plain)
    with pytest.raises(CompiledDecodingUnsupported, match="call model.eval"):
        CompiledDecoder(build_llama().train())
    with pytest.raises(CompiledDecodingUnsupported, match=r"trainable \(model.embed_tokens.weight, ...\)"):
        CompiledDecoder(build_llama())
    CompiledDecoder(build_llama(), compile=False)  # the eager step reads the live weights: nothing to freeze
    assert CompiledDecoder(build_llama().requires_grad_(False), lengths=(64, 8, 100000)).lengths == (
        8,
        64,
        2048,
    )


def test_a_compiled_decoder_on_busy_cores_says_to_give_it_fewer_threads(monkeypatch):
    """The compiled step's parallel regions wait for every thread: on cores other work keeps busy it slowed
    3.2-5.5x, like or worse than the eager engine (3.3-3.6x; bench/README §31), so building one there warns; an eager
    static-cache decoder, a quiet machine or a thread count the user set do not."""
    from deltatune.core.errors import DeltatuneWarning

    model = build_llama().requires_grad_(False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("os.getloadavg", lambda: (4.0, 4.0, 4.0))
    with pytest.warns(DeltatuneWarning, match="load is 4.0 on 2 cores.*compiled decode step suffers most"):
        CompiledDecoder(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CompiledDecoder(model, compile=False)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        CompiledDecoder(model)
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr("os.getloadavg", lambda: (0.3, 0.3, 0.3))
        CompiledDecoder(model)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_bf16_model_decodes_over_a_float32_static_cache_as_the_engine_does(compile):
    """A half-precision model on a CPU: the static cache holds float32 keys and values and the prompt and
    steps attend in float32, as the engine's decode steps do; each row's greedy tokens are the engine's, and
    the model's attention setting is its own again after. (Scores are not compared: the engine's prompt pass
    attends in bf16, so the two caches differ by bf16's rounding.)"""
    model = bf16_with_float32_adapters().requires_grad_(False)
    decoder = CompiledDecoder(model, "b", lengths=(32,), compile=compile)
    for prompt in PROMPTS:
        engine = dt.runtime.generate(
            model, [prompt], ["b"], max_new_tokens=12, pad_token_id=0, eos_token_id=None
        )[0]
        assert _decode(decoder, prompt, 12).tokens == engine.tokens
    assert {layer.keys.dtype for layer in decoder._caches[32].layers} == {torch.float32}
    assert model.config._attn_implementation == "sdpa" and decoder.fell_back is None


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_packed_base_compiles_with_its_adapter_and_decodes_as_the_engine_does(scheme):
    """`generate --quantize int8 --compile`: the packed layers' kernels (inductor lowers them to its own
    weight-only templates) and the adapter's products in the compiled graph; each row's greedy tokens are the
    top tokens of transformers' forward on the same packed model up to bf16's rounding (the compiled kernels
    round in other places than the eager ones), and nothing fell back to eager."""
    from test_weight_only import _packed_llama, assert_top_tokens
    from test_weight_only import _with_adapters as with_float32_adapters

    model = with_float32_adapters(_packed_llama(scheme, spread=True), ("a", "b"))
    decoder = CompiledDecoder(model, "b", lengths=(32,))
    for prompt in PROMPTS:
        assert_top_tokens(model, "b", prompt, _decode(decoder, prompt, 12).tokens)
    assert decoder.fell_back is None
