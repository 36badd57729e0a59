"""Continuous batching: rows that join a running batch at different steps, with different adapters, prompt
lengths and token limits, get exactly the tokens they get alone; rows leave as they end."""

from __future__ import annotations

import pytest
import torch
from conftest import build_gpt2, build_llama
from test_runtime import ADAPTERS, ROWS, _prompts, _with_adapters

import deltatune as dt
from deltatune.runtime import generate
from deltatune.runtime.decode import ContinuousBatchingUnsupported, DecodeBatch
from deltatune.runtime.sampling import Sampling


def _alone(model, prompt, adapter, limit, eos=None):
    """The row alone through transformers' generate: the reference the engine must equal."""
    (done,) = generate(
        model, [prompt], [adapter], max_new_tokens=limit, pad_token_id=0, eos_token_id=eos, continuous=False
    )
    return done


def _drive(batch: DecodeBatch, arrivals: dict[int, list[tuple]]) -> dict[int, list[int]]:
    """Run steps, adding arrivals[step] = [(prompt, adapter, limit), ...] before that step; returns each
    row's streamed tokens, keyed by the order rows were added."""
    streamed: dict[int, list[int]] = {}
    order: list[int] = []
    step = 0
    while step <= max(arrivals) or len(batch):
        steps = []
        if step in arrivals:
            prompts, adapters, limits = zip(*arrivals[step], strict=True)
            steps += batch.add(prompts, adapters, max_new_tokens=limits)
        steps += batch.step()
        for s in steps:
            if s.row not in streamed:
                order.append(s.row)
            streamed.setdefault(s.row, [])
            if s.token is not None:
                streamed[s.row].append(s.token)
        step += 1
    return {i: streamed[handle] for i, handle in enumerate(order)}


@pytest.mark.parametrize("build", [build_llama, build_gpt2], ids=["llama", "gpt2"])
def test_rows_joining_a_running_batch_equal_each_row_alone(build, device):
    adapters = ADAPTERS if build is build_llama else {"a": (2, ["c_attn"]), "b": (4, ["c_attn", "c_fc"])}
    rows = ROWS if build is build_llama else ["a", None, "b", "a", "b", None]
    model = _with_adapters(build, adapters).to(device)
    prompts, limits = _prompts(), [6, 9, 3, 8, 5, 7]
    jobs = list(zip(prompts, rows, limits, strict=True))
    # two rows at first, one after 2 steps, three more after 4 (while the 3-token row has already left)
    arrivals = {0: jobs[:2], 2: jobs[2:3], 4: jobs[3:]}
    batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None)
    streamed = _drive(batch, arrivals)
    assert len(batch) == 0 and batch.cache is None
    handles = sorted(batch.finished)
    for i, (prompt, adapter, limit) in enumerate(jobs):
        alone = _alone(model, prompt, adapter, limit)
        done = batch.completion(handles[i])
        assert streamed[i] == done.tokens == alone.tokens and len(done.tokens) == limit
        assert done.finish_reason == "length" and done.prompt_tokens == len(prompt)
    assert batch.finished == {}


def _windowed_and_alibi():
    """Tiny Mistral and Gemma-2 with a sliding window of 4 (Gemma-2: every other layer; prompts and answers
    run past it), and BLOOM, whose ALiBi reads each row's positions from its attention mask."""
    from architectures import ARCHITECTURES

    by_name = {a.name: a for a in ARCHITECTURES}
    qv = {"a": (2, ["q_proj", "v_proj"]), "b": (4, "all-linear")}
    fused = {"a": (2, ["query_key_value"]), "b": (4, "all-linear")}
    return [("mistral", by_name["mistral"].build, qv), ("gemma2", by_name["gemma2"].build, qv),
            ("bloom", by_name["bloom"].build, fused), ("falcon", by_name["falcon"].build, fused)]  # fmt: skip


@pytest.mark.parametrize(
    "name, build, adapters", _windowed_and_alibi(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_sliding_window_and_alibi_rows_joining_a_running_batch_equal_each_row_alone(name, build, adapters):
    model = _with_adapters(build, adapters)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (6, 2, 9, 5)]
    jobs = list(zip(prompts, ["a", None, "b", "a"], [8, 10, 6, 9], strict=True))
    batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None)
    streamed = _drive(batch, {0: jobs[:2], 3: jobs[2:3], 5: jobs[3:]})
    for i, (prompt, adapter, limit) in enumerate(jobs):
        assert streamed[i] == _alone(model, prompt, adapter, limit).tokens, (name, i)


def test_rows_leave_at_end_of_sequence_and_on_request():
    model = _with_adapters()
    prompts = _prompts()[:3]
    free = [_alone(model, p, a, 10) for p, a in zip(prompts, ["a", "b", "c"], strict=True)]
    tokens = free[1].tokens
    at = next(k for k in range(1, 10) if tokens[k] not in tokens[:k] + free[0].tokens[:4])
    batch = DecodeBatch(model, pad_token_id=0, eos_token_id=tokens[at])  # row 1 ends at its token `at`
    first = batch.add(prompts, ["a", "b", "c"], max_new_tokens=[10, 10, 10])
    handles = [s.row for s in first]
    steps = 1
    while len(batch):
        if steps == 4:
            batch.end(handles[0])  # row 0's client goes away with 4 tokens
        live = len(batch)
        batch.step()
        steps += 1
        assert len(batch) <= live
    ended = [batch.completion(h) for h in handles]
    assert ended[0].tokens == free[0].tokens[:4] and ended[0].finish_reason == "cancelled"
    assert ended[1].tokens == tokens[:at] and ended[1].finish_reason == "stop"
    assert ended[2].tokens == free[2].tokens and ended[2].finish_reason == "length"


def test_cache_is_cut_to_what_live_rows_need():
    model = _with_adapters()
    long_prompt, short_prompt = list(range(1, 21)), [5, 6]
    batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None)
    (long_row,) = batch.add([long_prompt], ["a"], max_new_tokens=[3])
    batch.add([short_prompt], ["b"], max_new_tokens=[8])
    assert batch.mask.shape == (2, 20) and batch.cache.get_seq_length() == 20
    batch.step()
    batch.step()  # the long row ends with its 3rd token
    assert len(batch) == 1 and batch.finished[long_row.row].finish_reason == "length"
    # only the short row is left: its 2 prompt tokens + 2 new ones fed back, no padding columns
    assert batch.mask.shape == (1, 4) and batch.cache.get_seq_length() == 4 and bool(batch.mask.all())


def test_sampling_follows_each_rows_settings():
    model = _with_adapters()
    prompts = _prompts()[:2]
    batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    sampling = [Sampling(0.0, 1.0), Sampling(1.5, 0.9)]
    steps = batch.add(prompts, ["a", "b"], max_new_tokens=[6, 6], sampling=sampling)
    while len(batch):
        steps += batch.step()
    greedy = batch.completion(steps[0].row)
    assert greedy.tokens == _alone(model, prompts[0], "a", 6).tokens  # temperature 0 stays greedy
    # top_p so small that only the most likely token is left: sampling equals greedy
    batch.add([prompts[1]], ["b"], max_new_tokens=[6], sampling=[Sampling(1.0, 1e-6)])
    while len(batch):
        batch.step()
    (handle,) = batch.finished.keys() - {steps[1].row}
    assert batch.completion(handle).tokens == _alone(model, prompts[1], "b", 6).tokens


def test_refuses_what_it_cannot_batch():
    model = _with_adapters()
    dt.inject(model, dt.PromptTuningConfig(num_virtual_tokens=3, token_dim=32), adapter_name="prompt")
    model.eval()
    batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None)
    with pytest.raises(ContinuousBatchingUnsupported, match="PROMPT_TUNING"):
        batch.add([[1, 2]], ["prompt"], max_new_tokens=[3])
    with pytest.raises(dt.AdapterNameError):
        batch.add([[1, 2]], ["nope"], max_new_tokens=[3])
    with pytest.raises(ValueError, match="no tokens"):
        batch.add([[]], ["a"], max_new_tokens=[3])
    assert len(batch) == 0 and batch.cache is None

    class NoPositions(torch.nn.Module):  # e.g. ALiBi models (Bloom): positions come from the mask alone
        def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None):
            raise AssertionError("not reached")

    with pytest.raises(ContinuousBatchingUnsupported, match="position_ids"):
        DecodeBatch(NoPositions().eval(), pad_token_id=0, eos_token_id=None).add(
            [[1]], [None], max_new_tokens=[1]
        )


def test_row_stacks_updated_in_place_equal_a_fresh_build():
    """Rows joining (adapters of larger ranks, targeting layers no row used yet) and leaving (the last row
    moving into the gap) leave each row the same update as stacks built from scratch for the final rows."""
    from deltatune.runtime.mixed import RowUpdates, StackWorkspace, check_mixable

    model = _with_adapters()
    for capacity in (8, 3):  # room for every row; too little, so joining rebuilds everything
        rows = ["a", None, "a"]
        updates = RowUpdates(model, rows, check_mixable(model, rows), StackWorkspace(), capacity=capacity)
        updates.append(["b", None], check_mixable(model, ["b"]))  # b: rank 4 > 2, and more layers
        updates.remove(1)  # the last row (None) takes its place
        updates.append(["c"], check_mixable(model, ["c"]))  # c: rank 8
        updates.remove(0)
        updates.remove(3)
        assert updates.rows == ["c", None, "a"]
        fresh = RowUpdates(model, updates.rows, check_mixable(model, updates.rows), None)
        compared = 0
        for (layer, mine), (same, theirs) in zip(updates.stacks, fresh.stacks, strict=True):
            assert layer is same
            if theirs is None:
                continue
            for row in range(3):  # the row's update s B A, whatever rank its stack is padded to
                (a_mine, b_mine), (a_fresh, b_fresh) = mine.factors(3), theirs.factors(3)
                torch.testing.assert_close(a_mine[row] @ b_mine[row], a_fresh[row] @ b_fresh[row])
            compared += 1
        assert compared == len([1 for _, t in fresh.stacks if t is not None]) > 0


def test_decoding_leaves_the_models_adapter_state_alone():
    """Steps switch adapters by attribute writes (core.adapters.activated), restored after every forward."""
    model = _with_adapters()
    dt.set_adapter(model, "b")
    before = [(w.active_adapters, w.adapters_disabled) for _, w in dt.core.adapters.all_wrappers(model)]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None)
    batch.add(_prompts()[:2], ["a", None], max_new_tokens=[2, 4])  # mixed rows, then one base row
    while len(batch):
        batch.step()
    assert [
        (w.active_adapters, w.adapters_disabled) for _, w in dt.core.adapters.all_wrappers(model)
    ] == before
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert all("forward" not in vars(layer) for _, layer in dt.core.adapters.adapter_layers(model))


def bf16_with_float32_adapters():
    """The test model in bf16 with its adapters kept float32 (as loading keeps them on a half base), its
    scores spread past bf16's noise (a random model's are nearly uniform)."""
    model = _with_adapters().to(torch.bfloat16)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()
    model.lm_head.weight.data *= 40
    return model


def test_mixed_float32_adapters_on_a_bfloat16_base_score_as_each_row_alone():
    """`serve --dtype bfloat16`: adapters stay float32 on the half base, and a mixed batch (each row its own
    adapter) scores each row's tokens as that row does alone through transformers' generate, within bf16's
    precision (the two paths round in different places, so equality is not asked of bf16)."""
    assert_mixed_rows_score_as_alone(bf16_with_float32_adapters(), _prompts()[:3], ["a", "b", None])


def assert_mixed_rows_score_as_alone(model, prompts, rows, steps: int = 3) -> None:
    """A half-precision mixed batch of `steps` tokens a row: each row's top 3 first tokens are those of the
    row run alone through transformers' generate, their log-probabilities within 0.1 (bf16's precision, and
    narrower than their spread; later steps follow caches that differ by bf16's rounding)."""
    asked = Sampling(logprobs=3)
    together = generate(
        model, prompts, rows, max_new_tokens=steps, pad_token_id=0, eos_token_id=None, sampling=asked
    )
    for prompt, row, mixed in zip(prompts, rows, together, strict=True):
        (alone,) = generate(
            model, [prompt], [row], max_new_tokens=steps, pad_token_id=0, eos_token_id=None, sampling=asked,
            continuous=False,
        )  # fmt: skip
        assert len(mixed.logprobs) == len(alone.logprobs) == steps
        first, reference = mixed.logprobs[0], alone.logprobs[0]
        assert [token for token, _ in first.top] == [token for token, _ in reference.top], row
        spread = reference.top[0][1] - reference.top[-1][1]
        for (_, logprob), (_, expected) in zip(first.top, reference.top, strict=True):
            assert abs(logprob - expected) < 0.1 < spread, (row, logprob, expected, spread)
