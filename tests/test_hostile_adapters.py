"""Adapter folders come from other people: every hostile or damaged one is refused by `load_adapter` (and by the
server's adapter cache, which hot-swaps into free slots) with an error naming the problem, quickly, and before
anything is allocated for it; the model is left as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.core.errors import AdapterConfigError, AdapterFormatError, DeltatuneError


@pytest.fixture(scope="module")
def saved(tiny_causal_lm, tmp_path_factory) -> Path:
    model = _model(tiny_causal_lm)
    torch.manual_seed(0)
    dt.inject(model, dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), "a")
    folder = tmp_path_factory.mktemp("hostile") / "good"
    dt.save_adapter(model, folder, adapter_name="a")
    return folder


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _variant(saved: Path, tmp_path: Path, config_edit=None, weights_edit=None) -> Path:
    """A copy of the good adapter without its provenance (a hand-edited file has no valid record)."""
    folder = tmp_path / "adapter"
    shutil.copytree(saved, folder)
    (folder / "deltatune.json").unlink()
    if config_edit is not None:
        config_file = folder / "adapter_config.json"
        edited = config_edit(json.loads(config_file.read_text()))
        if isinstance(edited, bytes):
            config_file.write_bytes(edited)
        else:
            config_file.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    if weights_edit is not None:
        weights = folder / "adapter_model.safetensors"
        state = {k: v.clone() for k, v in load_file(weights).items()}
        weights_edit(state)
        save_file(state, weights)
    return folder


def _refused(tiny_causal_lm, folder: Path, error: type[Exception], match: str) -> None:
    model = _model(tiny_causal_lm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        dt.load_adapter(model, folder, adapter_name="x")
    assert not dt.core.adapters.adapter_configs(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _set(key, value):
    def edit(config):
        config[key] = value
        return config

    return edit


CASES = {
    # nested quantifiers: with the stdlib `re`, these take exponential time on module names
    "nested-quantifier-a": (_set("target_modules", "(a+)+$"), dt.TargetingError, "matches no module|match"),
    "nested-quantifier-dot": (_set("target_modules", "(.+)+X"), dt.TargetingError, "match"),
    # one the regex package cannot shortcut either: RE2 refuses to compile it, on any machine at any load
    "slow-pattern": (
        _set("target_modules", "(.*){1,32000}[bc]"),
        AdapterConfigError,
        "cannot be matched in time linear",
    ),
    "slow-rank-pattern": (
        _set("rank_pattern", {"(.*){1,32000}[bc]": 4}),
        AdapterConfigError,
        "cannot be matched in time linear",
    ),
    "invalid-regex": (
        _set("target_modules", "(q_proj"),
        AdapterConfigError,
        "not a valid regular expression",
    ),
    "huge-pattern": (_set("target_modules", "q" * 5000), AdapterConfigError, "over the limit"),
    "huge-r": (_set("r", 10**12), AdapterFormatError, "rank 1000000000000 .* saved weights have rank 2"),
    "float-r": (_set("r", 1e12), AdapterConfigError, "r must be int"),
    "bool-r": (_set("r", True), AdapterConfigError, "r must be int"),
    "nan-alpha": (
        lambda c: json.dumps(c).replace('"lora_alpha": 4', '"lora_alpha": NaN'),
        AdapterConfigError,
        "lora_alpha must be float, got nan \\(not finite\\)",
    ),  # fmt: skip
    # finite, but every output overflows: the server loaded it and then failed every request (500 or 409)
    "huge-alpha": (_set("lora_alpha", 1e308), AdapterConfigError, "lora_alpha is 1e\\+308; its magnitude"),
    "huge-negative-alpha": (_set("lora_alpha", -1e300), AdapterConfigError, "must be at most 1e\\+06"),
    "huge-alpha-pattern": (_set("alpha_pattern", {"q_proj": 1e40}), AdapterConfigError, "alpha_pattern"),
    "target-modules-number": (_set("target_modules", 5), AdapterConfigError, "target_modules must be"),
    "rank-pattern-string-values": (_set("rank_pattern", {"q_proj": "4"}), AdapterConfigError, "rank_pattern"),
    "long-list": (_set("target_modules", ["q_proj"] * 5000), AdapterConfigError, "over 4096 entries"),
    "peft-type-object": (_set("peft_type", {"a": 1}), AdapterConfigError, "peft_type must be a string"),
    "not-utf8": (lambda c: json.dumps(c).encode("utf-16"), AdapterConfigError, "not UTF-8"),
    "deeply-nested": (lambda c: "[" * 200_000 + "]" * 200_000, AdapterConfigError, "nested too deeply"),
    "too-large": (lambda c: json.dumps(c | {"padding": "x" * (2 << 20)}), AdapterConfigError, "too large"),
    "not-an-object": (lambda c: "[1, 2]", AdapterConfigError, "expected a JSON object"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_hostile_configs_are_refused_quickly_and_by_name(tiny_causal_lm, saved, tmp_path, case):
    edit, error, match = CASES[case]
    _refused(tiny_causal_lm, _variant(saved, tmp_path, config_edit=edit), error, match)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_weights_with_non_finite_values_are_refused(tiny_causal_lm, saved, tmp_path, value):
    def poison(state):
        key = sorted(state)[0]
        state[key][0, 0] = value

    folder = _variant(saved, tmp_path, weights_edit=poison)
    _refused(tiny_causal_lm, folder, AdapterFormatError, "hold NaN or inf values")


def test_a_damaged_provenance_record_is_refused_by_name(tiny_causal_lm, saved, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(saved, folder)
    (folder / "deltatune.json").write_text('{"a": ' * 100_000)
    _refused(tiny_causal_lm, folder, AdapterFormatError, "deltatune.json: JSON nested too deeply")
    (folder / "deltatune.json").write_bytes(b'{"schema_version": 1, "x": "\xff"}')
    _refused(tiny_causal_lm, folder, AdapterFormatError, "not UTF-8")


def test_nested_quantifiers_run_on_a_matcher_that_cannot_backtrack():
    """`(.+)+X` takes time exponential in the name's length under the stdlib `re`; here it runs on RE2, whose
    time is linear by construction: the verdict is the same on any machine, with no clock involved."""
    from deltatune.core import patterns

    for pattern in ("(.+)+X", "(a+)+$", "(.*){1,1000}[bc]"):
        assert type(patterns.compiled(pattern)).__module__.startswith("re2")
    assert not patterns.matches("(.+)+X", "model.layers.0.self_attn.q_proj" * 40)
    assert patterns.matches("(.+)+X", "model.layers.0.X")


def test_a_free_slot_refuses_a_config_that_contradicts_its_weights(tiny_causal_lm, saved, tmp_path):
    """The server's cache copies a new adapter into a free slot of the same tensor shapes; the config's rank
    must agree with those tensors there exactly as on a fresh load."""
    from deltatune.runtime import AdapterCache

    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(saved, root / "good")
    (root / "liar").mkdir()
    liar = _variant(saved, tmp_path, config_edit=_set("r", 8))
    for file in liar.iterdir():
        shutil.copy(file, root / "liar" / file.name)
    model = _model(tiny_causal_lm)
    cache = AdapterCache(model, root)
    cache.load("good")
    cache.unload("good")
    assert cache.free_slot_bytes > 0
    with pytest.raises(AdapterFormatError, match="rank 8 .* saved weights have rank 2"):
        cache.load("liar")  # via the free slot
    assert cache.free_slot_bytes > 0 and "liar" not in cache  # the slot is still free, unchanged
    with pytest.raises(AdapterFormatError, match="rank 8 .* saved weights have rank 2"):
        dt.load_adapter(_model(tiny_causal_lm), root / "liar")  # a fresh load says the same


def test_every_refusal_is_a_deltatune_error():
    """What the server maps to a 4xx: all of the above derive from DeltatuneError."""
    assert all(issubclass(error, DeltatuneError) for _, error, _ in CASES.values())


def _saved_method(tiny_causal_lm, tmp_path, config) -> Path:
    model = _model(tiny_causal_lm)
    torch.manual_seed(0)
    dt.inject(model, config, "m")
    folder = tmp_path / "method-adapter"
    dt.save_adapter(model, folder, adapter_name="m")
    (folder / "deltatune.json").unlink()  # hand-edited below: no valid record
    return folder


@pytest.mark.parametrize(
    ("config", "key", "value", "match"),
    [
        (
            dt.PromptTuningConfig(num_virtual_tokens=4),
            "num_virtual_tokens",
            10**9,
            r"prompt_embeddings of shape \(1000000000, 32\)",
        ),
        (
            dt.PromptTuningConfig(num_virtual_tokens=4),
            "token_dim",
            10**9,
            "input embeddings have width|shape",
        ),
        (dt.PrefixTuningConfig(num_virtual_tokens=4), "num_virtual_tokens", 10**9, "the saved tensor is"),
        (dt.PrefixTuningConfig(num_virtual_tokens=4), "num_layers", 10**6, "the saved tensor is"),
        (dt.BottleneckConfig(bottleneck_size=4), "bottleneck_size", 10**9, "saved down projections are"),
    ],
    ids=["prompt-tokens", "prompt-width", "prefix-tokens", "prefix-layers", "bottleneck-size"],
)
def test_sizes_of_other_methods_are_checked_against_the_saved_tensors(
    tiny_causal_lm, tmp_path, config, key, value, match
):
    folder = _saved_method(tiny_causal_lm, tmp_path, config)
    file = folder / "adapter_config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | {key: value}))
    _refused(tiny_causal_lm, folder, DeltatuneError, match)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_without_their_tensor_are_refused_before_anything_is_allocated(
    tiny_causal_lm, tmp_path, method
):
    """With no prompt_embeddings to check the config against, num_virtual_tokens 10**9 once made the loader
    allocate what the config asked (13.8 TB for a SmolLM2 prefix) before naming the missing tensor."""
    from safetensors.torch import load_file, save_file

    config = (
        dt.PromptTuningConfig(num_virtual_tokens=4)
        if method == "prompt"
        else dt.PrefixTuningConfig(num_virtual_tokens=4)
    )
    folder = _saved_method(tiny_causal_lm, tmp_path, config)
    weights = folder / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({"renamed": state.pop("prompt_embeddings")}, weights)
    file = folder / "adapter_config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | {"num_virtual_tokens": 10**9}))
    _refused(
        tiny_causal_lm, folder, AdapterFormatError, "needs a 2-D prompt_embeddings tensor .* holds no tensor"
    )


def test_a_projected_prefix_loads_without_building_its_mlp(tiny_causal_lm, tmp_path):
    """A saved prefix is already folded, so loading builds no MLP: a hostile encoder_hidden_size allocates
    nothing, and the loaded prefix is the saved one."""
    config = dt.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16)
    folder = _saved_method(tiny_causal_lm, tmp_path, config)
    file = folder / "adapter_config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | {"encoder_hidden_size": 10**12}))
    model = _model(tiny_causal_lm)
    dt.load_adapter(model, folder, adapter_name="p")
    saved = load_file(folder / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(dt.core.state.adapter_state_dict(model, "p")["prompt_embeddings"], saved)
