"""Multi-adapter runtime: mixed-adapter batches equal each row run alone, batched generation with left
padding and a KV cache, and the adapter cache (LRU within a byte budget, safe names, no base copies)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import build_gpt2, build_llama

import deltatune as dt
from deltatune.core.layer import AdapterLayer
from deltatune.runtime import (
    AdapterCache,
    AdapterNameInvalid,
    CacheFullError,
    MixedBatchError,
    generate,
    mixed_adapters,
    release_workspace,
)
from deltatune.runtime.generate import plan_batches

# Three LoRA adapters with different ranks and different target sets.
ADAPTERS = {"a": (2, ["q_proj", "v_proj"]), "b": (4, "all-linear"), "c": (8, ["down_proj", "o_proj"])}
ROWS = ["a", "b", None, "c", "a", "b"]


def _with_adapters(build=build_llama, adapters=ADAPTERS):
    model = build()
    for seed, (name, (r, targets)) in enumerate(adapters.items()):
        torch.manual_seed(seed + 10)
        config = dt.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        dt.inject(model, config, adapter_name=name)
    return model.eval()


def _single(model, ids, name):
    """One row through the ordinary path: its adapter active (or all disabled)."""
    with torch.no_grad():
        if name is None:
            with dt.disable_adapter(model):
                return model(ids).logits
        dt.set_adapter(model, name)
        return model(ids).logits


@pytest.mark.parametrize("build", [build_llama, build_gpt2], ids=["llama", "gpt2-conv1d"])
def test_mixed_batch_equals_each_row_alone(build, device):
    adapters = (
        ADAPTERS if build is build_llama else {"a": (2, ["c_attn"]), "b": (4, ["c_attn", "c_fc", "c_proj"])}
    )
    rows = ROWS if build is build_llama else ["a", None, "b", "a"]
    model = _with_adapters(build, adapters).to(device)
    ids = torch.randint(0, 96, (len(rows), 7), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad(), mixed_adapters(model, rows):
        mixed = model(ids).logits
    base = _single(model, ids, None)
    for i, name in enumerate(rows):
        alone = _single(model, ids[i : i + 1], name)[0]
        torch.testing.assert_close(mixed[i], alone, atol=2e-6, rtol=0)
        if name is not None:  # the adapters really change the output, so the equality above is not vacuous
            assert (alone - base[i]).abs().max() > 1e-2


def test_mixed_batch_leaves_model_as_it_was():
    model = _with_adapters()
    dt.set_adapter(model, "b")
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(4))
    before = _single(model, ids, "b")
    hooks = {n: len(m._forward_hooks) for n, m in model.named_modules()}
    with torch.no_grad(), mixed_adapters(model, ["a", "c"]):
        model(ids)
    assert dt.active_adapters(model) == ["b"]
    assert {n: len(m._forward_hooks) for n, m in model.named_modules()} == hooks
    assert all("forward" not in vars(m) for m in model.modules())  # no mixed-batch forward left installed
    torch.testing.assert_close(_single(model, ids, "b"), before, atol=0, rtol=0)


def test_mixed_batches_reuse_their_workspace_and_nest_safely():
    model = _with_adapters()
    ids = torch.randint(0, 96, (len(ROWS), 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), mixed_adapters(model, ROWS):
        first = model(ids).logits
    with torch.no_grad(), mixed_adapters(model, ROWS):
        again = model(ids).logits  # the same buffers, refilled
        with mixed_adapters(model, list(reversed(ROWS))):  # nested: must not disturb the outer block
            inner = model(ids).logits
        after_inner = model(ids).logits
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(after_inner, first, atol=0, rtol=0)
    for i, name in enumerate(reversed(ROWS)):
        torch.testing.assert_close(inner[i], _single(model, ids[i : i + 1], name)[0], atol=2e-6, rtol=0)
    held = release_workspace(model)
    assert held > 0 and release_workspace(model) == 0


def test_mixed_batch_refuses_what_it_cannot_batch():
    model = _with_adapters()
    torch.manual_seed(0)
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), adapter_name="dora")
    model.eval()
    with pytest.raises(MixedBatchError, match="DoRA"), mixed_adapters(model, ["a", "dora"]):
        pass
    with pytest.raises(dt.AdapterNameError, match="no adapter named 'nope'"), mixed_adapters(model, ["nope"]):
        pass
    ids = torch.randint(0, 96, (3, 4))
    # A forward with another batch size (what beam search would do) inside the block:
    with (
        pytest.raises(MixedBatchError, match="set up for 2 rows but a forward got 3"),
        torch.no_grad(),
        mixed_adapters(model, ["a", "b"]),
    ):
        model(ids)
    model.train()
    with pytest.raises(MixedBatchError, match="eval"), mixed_adapters(model, ["a", "b"]):
        pass


@pytest.fixture(params=[True, False], ids=["engine", "transformers"])
def continuous(request) -> bool:
    """Both paths of `generate`: the decode engine, and transformers' generate (the reference)."""
    return request.param


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(1, 96, (n,), generator=g).tolist() for n in (3, 7, 5, 1, 6, 4)]


def test_generate_mixed_rows_equal_each_row_alone(continuous, device):
    """Left padding (prompts of 1-7 tokens), KV cache, per-row max_new_tokens: each row's greedy tokens are
    those of the row generated alone, unpadded, with its adapter active."""
    model = _with_adapters().to(device)
    prompts, limits = _prompts(), [6, 8, 8, 8, 3, 5]
    mixed = generate(
        model, prompts, ROWS, max_new_tokens=limits, pad_token_id=0, eos_token_id=None, continuous=continuous
    )
    assert plan_batches(model, ROWS) == [list(range(len(ROWS)))]  # one batch for all rows
    outputs = set()
    for i, name in enumerate(ROWS):
        (alone,) = generate(
            model,
            [prompts[i]],
            [name],
            max_new_tokens=limits[i],
            pad_token_id=0,
            eos_token_id=None,
            continuous=continuous,
        )
        assert mixed[i].tokens == alone.tokens and len(alone.tokens) == limits[i]
        assert mixed[i].finish_reason == "length" and mixed[i].prompt_tokens == len(prompts[i])
        outputs.add((tuple(prompts[i]), tuple(alone.tokens)))
    assert len(outputs) == len(ROWS)


def test_generate_stops_rows_at_end_of_sequence(continuous):
    model = _with_adapters()
    prompts = _prompts()[:2]
    free = generate(
        model, prompts, ["a", "b"], max_new_tokens=6, pad_token_id=0, eos_token_id=None, continuous=continuous
    )
    stop = free[1].tokens[2]  # make row 1's third token the end-of-sequence token
    ended = generate(
        model, prompts, ["a", "b"], max_new_tokens=6, pad_token_id=0, eos_token_id=stop, continuous=continuous
    )
    assert (
        ended[1].finish_reason == "stop" and ended[1].tokens == free[1].tokens[: free[1].tokens.index(stop)]
    )
    if stop not in free[0].tokens:
        assert ended[0].tokens == free[0].tokens and ended[0].finish_reason == "length"


def test_generate_batch_ends_when_every_row_has_ended(continuous):
    """A short row at its own limit and a long row at end-of-sequence: the batch stops there, not at the
    long row's limit (model.generate alone would run on for the row that has not seen end-of-sequence)."""
    model = _with_adapters()
    prompts = _prompts()[:2]

    def run(eos):
        return generate(
            model, prompts, ["a", "b"], max_new_tokens=[2, 12], pad_token_id=0, eos_token_id=eos,
            continuous=continuous,
        )  # fmt: skip

    free = run(None)
    tokens = free[1].tokens
    at = next(k for k in range(2, 12) if tokens[k] not in tokens[:k] + free[0].tokens)
    stop = tokens[at]  # row 1 ends with this token, the first new one from the 3rd on
    forwards = []
    hook = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        ended = run(stop)
    finally:
        hook.remove()
    assert ended[1].tokens == tokens[:at] and ended[1].finish_reason == "stop"
    assert ended[0].tokens == free[0].tokens and ended[0].finish_reason == "length"
    assert at < 11 and len(forwards) == at + 1  # the batch ended with row 1's end-of-sequence, not its 12th


def test_generate_streams_tokens_and_ends_cancelled_rows_early(continuous):
    model = _with_adapters()
    prompts = _prompts()[:2]
    same = dict(max_new_tokens=12, pad_token_id=0, eos_token_id=None, continuous=continuous)
    full = generate(model, prompts, ["a", "b"], **same)
    seen: dict[int, list[int]] = {0: [], 1: []}
    done = generate(
        model,
        prompts,
        ["a", "b"],
        **same,
        on_token=lambda row, token, _: seen[row].append(token),
        stop_rows=lambda row, new: row == 0 and len(new) >= 3,  # row 0's reader leaves at its 3rd token
    )
    assert seen[1] == done[1].tokens == full[1].tokens and done[1].finish_reason == "length"
    assert seen[0] == done[0].tokens == full[0].tokens[:3] and done[0].finish_reason == "cancelled"


def test_generate_runs_unmixable_adapters_in_their_own_batch(continuous):
    model = _with_adapters()
    torch.manual_seed(0)
    dt.inject(model, dt.PromptTuningConfig(num_virtual_tokens=3, token_dim=32), adapter_name="prompt")
    model.eval()
    rows = ["a", "prompt", "b", "prompt"]
    assert plan_batches(model, rows) == [[0, 2], [1, 3]]
    prompts = _prompts()[:4]
    mixed = generate(
        model, prompts, rows, max_new_tokens=4, pad_token_id=0, eos_token_id=None, continuous=continuous
    )
    for i, name in enumerate(rows):
        (alone,) = generate(
            model,
            [prompts[i]],
            [name],
            max_new_tokens=4,
            pad_token_id=0,
            eos_token_id=None,
            continuous=continuous,
        )
        assert mixed[i].tokens == alone.tokens


def test_the_engine_and_transformers_generate_the_same_tokens():
    """The fixed batch on the decode engine (rows leave as they end) against transformers' generate."""
    model = _with_adapters()
    prompts, limits = _prompts(), [6, 8, 8, 8, 3, 5]
    free = generate(model, prompts, ROWS, max_new_tokens=limits, pad_token_id=0, eos_token_id=None)
    stop = free[1].tokens[3]
    for eos in (None, stop):
        engine, reference = (
            generate(
                model,
                prompts,
                ROWS,
                max_new_tokens=limits,
                pad_token_id=0,
                eos_token_id=eos,
                continuous=continuous,
            )  # fmt: skip
            for continuous in (True, False)
        )
        assert [(c.tokens, c.finish_reason) for c in engine] == [
            (c.tokens, c.finish_reason) for c in reference
        ]
    assert any(c.finish_reason == "stop" for c in reference)  # the end-of-sequence case did end a row


@pytest.mark.parametrize("continuous", [True, False], ids=["engine", "transformers"])
def test_generate_refuses_non_finite_scores_on_both_paths(continuous):
    from deltatune.runtime.decode import NonFiniteOutput

    model = _with_adapters()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["a"].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteOutput, match="adapter 'a'.*NaN"):
        generate(
            model, _prompts()[:2], [None, "a"], max_new_tokens=3, pad_token_id=0, eos_token_id=None,
            continuous=continuous,
        )  # fmt: skip
    (base,) = generate(model, _prompts()[:1], [None], max_new_tokens=3, pad_token_id=0, eos_token_id=None)
    assert len(base.tokens) == 3  # the base rows are unaffected


def test_a_merged_adapter_generates_through_transformers_then_the_engine_again():
    """Merged adapters keep the model off the engine (it cannot disable them per row) only while merged."""
    import importlib

    generate_module = importlib.import_module("deltatune.runtime.generate")  # the module, not the function
    model = _with_adapters()
    dt.set_adapter(model, "b")
    prompts = _prompts()[:3]
    unmerged = generate(model, prompts, ["b"] * 3, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    dt.merge(model)
    merged = generate(model, prompts, ["b"] * 3, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    assert [c.tokens for c in merged] == [c.tokens for c in unmerged]
    dt.unmerge(model)
    assert model not in generate_module._NOT_CONTINUOUS  # not written off for good
    used = []
    real = generate_module._on_engine
    generate_module._on_engine = lambda *a: used.append(1) or real(*a)
    try:
        again = generate(model, prompts, ["b"] * 3, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    finally:
        generate_module._on_engine = real
    assert used and [c.tokens for c in again] == [c.tokens for c in unmerged]


def test_training_evaluation_generates_with_the_active_adapter_on_the_one_path():
    """`task.metrics.generate_answers` decodes what `runtime.generate` gives the active adapter; a model
    with no adapters (full fine-tuning) generates with its own weights."""
    from deltatune.runtime.sampling import end_of_sequence_ids
    from deltatune.task.metrics import generate_answers

    class Letters:  # a stand-in tokenizer: decodes ids as letters
        pad_token_id, eos_token_id = 0, None

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(65 + i % 26) for i in ids)

    model = _with_adapters()
    dt.set_adapter(model, "b")
    model.train()
    prompts = _prompts()
    answers = generate_answers(model, Letters(), prompts, max_new_tokens=4, batch_size=4)
    assert model.training  # put back as it was
    model.eval()
    eos = end_of_sequence_ids(model, Letters())
    assert eos == [model.generation_config.eos_token_id]  # what transformers' generate stops at
    expected = generate(model, prompts, ["b"] * 6, max_new_tokens=4, pad_token_id=0, eos_token_id=eos)
    assert answers == [Letters().decode(c.tokens) for c in expected]
    base = generate(model, prompts, [None] * 6, max_new_tokens=4, pad_token_id=0, eos_token_id=eos)
    assert answers != [Letters().decode(c.tokens) for c in base]
    plain = build_llama().eval()
    plain_answers = generate_answers(plain, Letters(), prompts, max_new_tokens=4, batch_size=4)
    assert plain_answers == [Letters().decode(c.tokens) for c in base]  # same weights as the base rows


# ---- the adapter cache ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    return save_adapters(tmp_path_factory.mktemp("adapters"))


def save_adapters(root):
    """Folders r2, r4, r8 (different ranks and targets) saved from the tiny llama into `root`."""
    model = _with_adapters()
    for name, folder in (("a", "r2"), ("b", "r4"), ("c", "r8")):
        dt.save_adapter(model, root / folder, adapter_name=name)
    return root


def _logits(model, name_or_key, ids):
    return _single(model, ids, name_or_key)


def test_cache_loads_by_name_and_matches_the_saved_adapter(adapters_dir):
    reference = _with_adapters()
    model = build_llama()
    base_ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    cache = AdapterCache(model, adapters_dir)
    assert cache.available() == ["r2", "r4", "r8"]
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(6))
    for folder, name in (("r2", "a"), ("r4", "b"), ("r8", "c")):
        key = cache.load(folder).key
        torch.testing.assert_close(_logits(model, key, ids), _logits(reference, name, ids), atol=0, rtol=0)
    wrappers = {n: id(m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    cache.unload("r4")
    cache.load("r4")  # reloading reuses the wrappers; base weights are never copied
    assert {n: id(m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)} == wrappers
    after = {
        n.replace(".base_layer", ""): p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n
    }
    assert after == base_ptrs


def test_cache_evicts_least_recently_used_within_budget(adapters_dir):
    probe = AdapterCache(build_llama(), adapters_dir)
    sizes = {name: probe.load(name).bytes for name in ("r2", "r4", "r8")}
    model = build_llama()
    cache = AdapterCache(model, adapters_dir, budget_bytes=sizes["r4"] + sizes["r8"])
    cache.load("r4")
    cache.load("r8")
    cache.key_of("r4")  # r4 used more recently than r8
    cache.load("r2")  # r4 + r8 + r2 exceeds the budget: r8 goes
    assert [e.name for e in cache.loaded] == ["r4", "r2"]
    assert cache.bytes_used == sizes["r4"] + sizes["r2"] <= cache.budget_bytes
    assert len(dt.adapter_configs(model)) == 2  # evicted means deleted from the model, not only forgotten
    with cache.pinned(["r4", "r2"]):
        with pytest.raises(CacheFullError, match="does not fit"):
            cache.load("r8")  # both residents are pinned by a batch in flight
        assert [e.name for e in cache.loaded] == ["r4", "r2"]
    cache.load("r8")  # unpinned again: r4 is least recently used and goes
    assert {e.name for e in cache.loaded} == {"r2", "r8"}
    tiny = AdapterCache(build_llama(), adapters_dir, budget_bytes=sizes["r2"] - 1)
    with pytest.raises(CacheFullError, match="r2"):
        tiny.load("r2")
    assert tiny.loaded == [] and dt.adapter_configs(tiny.model) == {}


def test_cache_names_cannot_leave_the_directory(adapters_dir, tmp_path):
    outside = tmp_path / "outside"
    dt.save_adapter(_with_adapters(), outside, adapter_name="a")
    root = tmp_path / "served"
    root.mkdir()
    os.symlink(outside, root / "escape")
    os.symlink(adapters_dir / "r2", root / "inside")  # a link to another place is fine only if inside
    (root / "mixed").mkdir()
    for item in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(outside / item, root / "mixed" / item)
    cache = AdapterCache(build_llama(), root)
    for bad in ("../outside", "/etc", "..", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(AdapterNameInvalid):
            cache.load(bad)
    with pytest.raises(AdapterNameInvalid, match="symlink"):
        cache.load("escape")
    with pytest.raises(AdapterNameInvalid, match="symlink"):
        cache.load("mixed")
    with pytest.raises(dt.AdapterNotFoundError):
        cache.load("missing")
    assert cache.available() == []  # "inside" leads out of root too: root is the boundary
    assert dt.adapter_configs(cache.model) == {}


def test_mixed_batch_refuses_linear_subclasses_with_their_own_forward():
    class Doubling(torch.nn.Linear):  # the base preprocesses its input, so x A^T B^T is not its update
        def forward(self, x):
            return super().forward(2 * x)

    model = torch.nn.Sequential(Doubling(4, 4)).eval()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["0"]), adapter_name="x")
    model.eval()
    with pytest.raises(MixedBatchError, match="own forward"), mixed_adapters(model, ["x"]):
        pass
