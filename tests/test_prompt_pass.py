"""A prompt run in chunks (`PromptPass`) gives what one forward over the whole prompt gives: the same
log-probabilities for scoring, and, for a row that then joins the decode batch, the same tokens."""

from __future__ import annotations

import pytest
import torch
from test_decode import _alone
from test_runtime import _with_adapters

from deltatune.runtime.decode import DecodeBatch
from deltatune.runtime.prompt_pass import PromptPass
from deltatune.runtime.sampling import Sampling
from deltatune.runtime.scoring import prompt_logprobs


def _prompt(length: int, seed: int = 3) -> list[int]:
    return torch.randint(1, 96, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("adapter", [None, "a", "b"])
@pytest.mark.parametrize("chunk", [1, 5, 16, 40])
def test_scoring_in_chunks_equals_one_forward(adapter, chunk):
    model = _with_adapters()
    prompt = _prompt(37)
    (whole,) = prompt_logprobs(model, [prompt], [adapter], top=3)
    run = PromptPass(model, prompt, adapter, top=3)
    chunks = 0
    while not run.finished:
        before = run.remaining
        assert run.advance(chunk) == min(chunk, before)
        chunks += 1
    assert chunks == -(-len(prompt) // chunk)
    assert [s.token for s in run.scores] == prompt[1:] == [s.token for s in whole]
    got = torch.tensor([s.logprob for s in run.scores])
    want = torch.tensor([s.logprob for s in whole])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [[t for t, _ in s.top] for s in run.scores] == [[t for t, _ in s.top] for s in whole]


def test_advance_runs_at_most_the_budget():
    model = _with_adapters()
    run = PromptPass(model, _prompt(10), "a")
    assert [run.advance(4), run.advance(4), run.advance(4), run.advance(4)] == [4, 4, 2, 0]
    assert run.finished and run.scores == [] and run.last_logits.shape == (1, model.config.vocab_size)


@pytest.mark.parametrize("chunk", [3, 8])
def test_a_row_prefilled_in_chunks_joins_a_running_batch_and_equals_it_alone(chunk):
    """A long prompt prefilled chunk by chunk while two other rows keep decoding between its chunks."""
    model = _with_adapters()
    batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None)
    short = [_prompt(4, seed=1), _prompt(6, seed=2)]
    first = batch.add(short, ["a", None], max_new_tokens=[12, 12])
    tokens = {s.row: [s.token] for s in first}
    long_prompt, adapter = _prompt(23, seed=4), "b"
    run = PromptPass(model, long_prompt, adapter)
    joined = None
    while len(batch):
        if not run.finished:
            run.advance(chunk)
            if run.finished:
                (step,) = batch.add_prefilled(run, max_new_tokens=7, sampling=Sampling())
                joined = step.row
                tokens[joined] = [step.token]
        for s in batch.step():
            if s.token is not None:
                tokens[s.row].append(s.token)
    assert joined is not None
    for handle, (prompt, name, limit) in zip(
        [s.row for s in first] + [joined],
        [(short[0], "a", 12), (short[1], None, 12), (long_prompt, "b", 7)],
        strict=True,
    ):
        assert tokens[handle] == _alone(model, prompt, name, limit).tokens


def test_a_scoring_or_unfinished_pass_cannot_join():
    model = _with_adapters()
    batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None)
    run = PromptPass(model, _prompt(8), None)
    run.advance(3)
    with pytest.raises(ValueError, match="finished prefill"):
        batch.add_prefilled(run, max_new_tokens=2)
    scoring = PromptPass(model, _prompt(8), None, top=0)
    scoring.advance(8)
    with pytest.raises(ValueError, match="finished prefill"):
        batch.add_prefilled(scoring, max_new_tokens=2)
