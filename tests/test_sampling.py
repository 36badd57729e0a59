"""OpenAI's sampling settings on every generation path: presence and frequency penalties follow OpenAI's
formula, and a seeded row draws from its own generator, so its tokens equal a step-by-step reference run of
that row alone, whatever it is batched with and whichever path (decode engine or transformers) runs it."""

from __future__ import annotations

import math

import pytest
import torch
from test_runtime import _prompts, _single, _with_adapters

import deltatune as dt
from deltatune.runtime import generate
from deltatune.runtime.sampling import Sampler, Sampling, _penalize

STEPS = 8


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"logit_bias": ((3, 100.5),)}, "logit_bias values"),
        ({"logit_bias": ((-1, 1.0),)}, "logit_bias keys"),
        ({"logit_bias": ((3, 1.0), (3, 2.0))}, "names a token twice"),
    ],
)
def test_settings_no_row_can_use_are_refused(settings, needle):
    with pytest.raises(ValueError, match=needle):
        Sampling(**settings)


def test_penalties_follow_openais_formula():
    """score - frequency * count - presence * (count > 0), counting the row's new tokens only."""
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.6, 2.0], [0.0, 1.0, 3.0, 2.6, 2.0]])
    samplers = [Sampler(Sampling(presence_penalty=0.5, frequency_penalty=0.4)), Sampler(Sampling())]
    penalized = _penalize(logits, samplers, [[2, 2, 3], [2, 2, 3]])
    expected = torch.tensor([[0.0, 1.0, 3.0 - 0.8 - 0.5, 2.6 - 0.4 - 0.5, 2.0], [0.0, 1.0, 3.0, 2.6, 2.0]])
    torch.testing.assert_close(penalized, expected)
    negative = _penalize(logits[:1], [Sampler(Sampling(presence_penalty=-1.0))], [[4]])
    torch.testing.assert_close(negative[0, 4], torch.tensor(3.0))  # a negative penalty favours repeats


def _reference(
    model, prompt: list[int], adapter: str | None, sampling: Sampling, logprobs: list | None = None
):
    """The row alone, one full forward per token (no KV cache, no batching): OpenAI's formula written out.
    Each step's log-softmax of the raw scores goes into `logprobs` when given. Runs where the model is, with
    a generator there (CUDA draws differently from the CPU)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(sampling.seed) if sampling.seed is not None else None
    ids, new = list(prompt), []
    for _ in range(STEPS):
        scores = _single(model, torch.tensor([ids], device=device), adapter)[0, -1].float()
        if logprobs is not None:
            logprobs.append(torch.log_softmax(scores, -1))
        counts = torch.zeros_like(scores)
        for token in new:
            counts[token] += 1
        for token, bias in sampling.logit_bias:
            scores[token] += bias
        scores = scores - sampling.frequency_penalty * counts - sampling.presence_penalty * (counts > 0)
        if sampling.temperature == 0:
            token = int(scores.argmax())
        else:
            probs = torch.softmax((scores - scores.max()) / sampling.temperature, dim=-1)
            ordered, order = probs.sort(descending=True)
            keep = (ordered.cumsum(-1) - ordered) < sampling.top_p
            token = int(order[torch.multinomial(ordered * keep, 1, generator=generator)[0]])
        new.append(token)
        ids.append(token)
    return new


def _model():
    model = _with_adapters()
    dt.inject(model, dt.PromptTuningConfig(num_virtual_tokens=3, token_dim=32), adapter_name="prompt")
    return model.eval()


SETTINGS = {
    "greedy-penalized": Sampling(presence_penalty=0.7, frequency_penalty=0.5),
    "seeded": Sampling(temperature=1.0, seed=7),
    "seeded-top-p-penalized": Sampling(temperature=0.8, top_p=0.8, presence_penalty=1.0, seed=3),
    "seeded-biased": Sampling(
        temperature=1.0, frequency_penalty=0.4, seed=5, logit_bias=((5, 4.0), (20, -100.0))
    ),
}


@pytest.mark.parametrize("continuous", [True, False], ids=["engine", "transformers"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_row_equals_its_reference_run_alone(name, continuous, device):
    """Rows of three LoRA adapters, the base and a prompt-tuning adapter (which always runs through
    transformers' generate), batched together: each equals its own reference."""
    sampling = SETTINGS[name]
    model = _model().to(device)
    rows = ["a", "b", None, "prompt", "c", "a"]
    prompts = _prompts()
    torch.manual_seed(0)  # unseeded rows must not matter; seeded ones ignore it
    done = generate(
        model, prompts, rows, max_new_tokens=STEPS, pad_token_id=0, eos_token_id=None, continuous=continuous,
        sampling=sampling,
    )  # fmt: skip
    for prompt, adapter, completion in zip(prompts, rows, done, strict=True):
        assert completion.tokens == _reference(model, prompt, adapter, sampling), (adapter, prompt)
    if sampling.logit_bias:  # the bias moved the draws: a favoured token often, a banned one never
        drawn = [t for c in done for t in c.tokens]
        assert drawn.count(5) > len(drawn) // 4 and 20 not in drawn
    if sampling.penalized:  # the penalties changed what was generated, so the equality above says something
        plain = Sampling(sampling.temperature, sampling.top_p, seed=sampling.seed)
        assert any(
            c.tokens != _reference(model, p, a, plain) for p, a, c in zip(prompts, rows, done, strict=True)
        )


@pytest.mark.parametrize("continuous", [True, False], ids=["engine", "transformers"])
def test_logprobs_are_the_models_own_for_each_chosen_token(continuous):
    """Log-softmax of the raw scores (before penalties and temperature) for the chosen token and the k most
    likely, on rows batched with others that did not ask for any."""
    model = _model()
    rows, prompts = ["a", None, "prompt", "b"], _prompts()[:4]
    sampling = Sampling(temperature=0.9, frequency_penalty=0.6, seed=4, logprobs=3)
    streamed: dict[int, list] = {i: [] for i in range(len(rows))}
    done = generate(
        model, prompts, rows, max_new_tokens=STEPS, pad_token_id=0, eos_token_id=None, continuous=continuous,
        sampling=sampling, on_token=lambda row, token, logprob: streamed[row].append(logprob),
    )  # fmt: skip
    assert [streamed[i] for i in range(len(rows))] == [
        c.logprobs for c in done
    ]  # streaming hands them out too
    for prompt, adapter, completion in zip(prompts, rows, done, strict=True):
        steps: list[torch.Tensor] = []
        assert completion.tokens == _reference(model, prompt, adapter, sampling, steps)
        assert [t.token for t in completion.logprobs] == completion.tokens
        for chance, expected in zip(completion.logprobs, steps, strict=True):
            assert chance.logprob == pytest.approx(float(expected[chance.token]), abs=1e-5)
            best = expected.topk(3)
            assert [t for t, _ in chance.top] == best.indices.tolist()
            assert [lp for _, lp in chance.top] == pytest.approx(best.values.tolist(), abs=1e-5)
    eos = done[0].tokens[2]  # a row that ends at end-of-sequence keeps the log-probabilities of its tokens
    (ended, *_) = generate(
        model, prompts, rows, max_new_tokens=STEPS, pad_token_id=0, eos_token_id=eos, continuous=continuous,
        sampling=sampling,
    )  # fmt: skip
    first_eos = done[0].tokens.index(eos)
    assert ended.finish_reason == "stop" and ended.logprobs == done[0].logprobs[:first_eos]
    (plain,) = generate(model, prompts[:1], ["a"], max_new_tokens=2, pad_token_id=0, eos_token_id=None)
    assert plain.logprobs is None  # not asked: not computed
    (bare,) = generate(
        model,
        prompts[:1],
        ["a"],
        max_new_tokens=2,
        pad_token_id=0,
        eos_token_id=None,
        sampling=Sampling(logprobs=0),
    )
    assert len(bare.logprobs) == 2 and all(t.top == [] for t in bare.logprobs)


def test_seeds_choose_the_draws_and_an_unseeded_row_still_samples():
    model = _model()
    prompt = _prompts()[1]

    def sample(seed):
        (done,) = generate(
            model, [prompt], ["b"], max_new_tokens=STEPS, pad_token_id=0, eos_token_id=None,
            sampling=Sampling(temperature=1.0, seed=seed),
        )  # fmt: skip
        return tuple(done.tokens)

    assert sample(11) == sample(11)
    assert len({sample(seed) for seed in range(4)}) > 1
    assert sample(2**64 - 1) == sample(-1)  # seeds are taken modulo 2**64, as torch's generators take them
    torch.manual_seed(0)
    first = sample(None)
    torch.manual_seed(0)
    assert sample(None) == first and len(first) == STEPS  # unseeded rows draw from torch's global generator


def test_each_choice_of_a_prompt_gets_its_own_seed():
    seeded = Sampling(temperature=1.0, seed=2**64 - 1)
    seeds = [seeded.for_choice(j).seed for j in range(16)]
    assert seeds[0] == seeded.seed and len(set(seeds)) == 16 and all(0 <= s < 2**64 for s in seeds)
    assert (
        Sampling(temperature=1.0).for_choice(3).seed is None
    )  # unseeded choices draw from torch's generator


@pytest.mark.parametrize("adapter", ["b", None, "prompt"])
def test_scoring_a_prompt_equals_the_logprobs_of_generating_it(adapter):
    """prompt_logprobs over prompt + continuation (one full forward) gives the continuation's tokens the
    log-probabilities that generating them gave (prefill, then the KV cache), top alternatives included."""
    from deltatune.runtime.scoring import prompt_logprobs

    model = _model()
    prompt = _prompts()[1]
    (done,) = generate(
        model,
        [prompt],
        [adapter],
        max_new_tokens=STEPS,
        pad_token_id=0,
        eos_token_id=None,
        sampling=Sampling(logprobs=3),
    )
    (scored,) = prompt_logprobs(model, [prompt + done.tokens], [adapter], top=3)
    assert len(scored) == len(prompt) + STEPS - 1 and [s.token for s in scored] == prompt[1:] + done.tokens
    for got, want in zip(scored[len(prompt) - 1 :], done.logprobs, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]
    assert all(s.logprob <= 0 for s in scored)
    with pytest.raises(ValueError, match="no tokens"):
        prompt_logprobs(model, [[]], [adapter])


def test_a_bias_of_100_forces_its_token_and_one_outside_the_vocabulary_is_refused():
    model = _model()
    prompts = _prompts()[:3]
    for continuous in (True, False):
        done = generate(
            model, prompts, ["a", None, "prompt"], max_new_tokens=4, pad_token_id=0, eos_token_id=None,
            sampling=Sampling(temperature=1.0, logit_bias=((42, 100.0),)), continuous=continuous,
        )  # fmt: skip
        assert [c.tokens for c in done] == [[42] * 4] * 3
    with pytest.raises(ValueError, match=r"outside the vocabulary \(0 to 95\)"):
        generate(
            model,
            prompts,
            ["a"] * 3,
            max_new_tokens=2,
            pad_token_id=0,
            eos_token_id=None,
            sampling=Sampling(logit_bias=((96, 1.0),)),
        )
