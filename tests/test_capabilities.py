"""Declared capabilities: each method says what its adapters can do (merge, mixed batches, hot-swap), callers
ask instead of testing method names, and what a method declares is what it does. A method registered from
outside deltatune gains or lacks a capability by its declaration alone."""

from __future__ import annotations

import pytest
import torch
from conftest import CONTRACT_VARIANTS, build_llama, method_config
from test_runtime import _single

import deltatune as dt
from deltatune.core.capabilities import Capability, capability_refusal
from deltatune.core.hotswap import AdapterSlot, LayoutMismatch, saved_layout
from deltatune.core.registry import _METHODS, register
from deltatune.methods.ia3 import Ia3Config, Ia3Method
from deltatune.runtime.mixed import mixable_refusal, mixed_adapters

LINEAR_TARGETS = ["q_proj", "v_proj", "down_proj"]
ALL_VARIANTS = [v for variants in CONTRACT_VARIANTS.values() for v in variants]


def _config(variant: str, **overrides):
    from conftest import CASES

    if variant in {"prompt", "prefix", "prefix_projection"}:
        return method_config(CASES["llama"], variant, modules_to_save=None)
    return method_config(CASES["llama"], variant, modules_to_save=None, target_modules=LINEAR_TARGETS)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_a_declared_mixed_batch_equals_each_row_alone(variant):
    """Declared: rows with and without the adapter share one forward and each equals its row run alone.
    Not declared: the runtime refuses with the method's own reason."""
    model = build_llama()
    config = _config(variant)
    dt.inject(model, config)
    reason = capability_refusal(config, Capability.MIXED_BATCH)
    if reason is not None:
        refusal = mixable_refusal(model, "default")
        assert refusal is not None and reason in refusal and config.peft_type in refusal
        return
    assert mixable_refusal(model, "default") is None
    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(3))
    rows = ["default", None, "default"]
    with torch.no_grad(), mixed_adapters(model, rows):
        mixed = model(ids).logits
    for i, name in enumerate(rows):
        alone = _single(model, ids[i : i + 1], name)[0]
        torch.testing.assert_close(mixed[i], alone, atol=2e-6, rtol=0)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-2  # the adapter changes the output: not vacuous


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_a_declared_hotswap_equals_a_fresh_load(variant, tmp_path):
    """Declared: another saved adapter of the same layout copied into a loaded one gives what loading it
    fresh gives. Not declared: the slot and the layout reader refuse, naming why."""
    config = _config(variant)
    folders = []
    for seed in (1, 2):
        model = build_llama()
        torch.manual_seed(seed)
        dt.inject(model, config)
        folders.append(dt.save_adapter(model, tmp_path / f"s{seed}"))
    model = build_llama()
    dt.load_adapter(model, folders[0])
    reason = capability_refusal(config, Capability.HOTSWAP)
    if reason is not None:
        assert saved_layout(folders[0]) is None
        with pytest.raises(LayoutMismatch, match="cannot be hot-swapped") as err:
            AdapterSlot(model, "default")
        assert reason in str(err.value)
        return
    AdapterSlot(model, "default").overwrite(folders[1])
    fresh = build_llama()
    dt.load_adapter(fresh, folders[1])
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(5))
    assert torch.equal(_single(model, ids, "default"), _single(fresh, ids, "default"))


def test_config_dependent_refusals_name_the_setting():
    lora, dora = _config("lora"), _config("dora")
    assert capability_refusal(lora, Capability.MIXED_BATCH) is None
    assert "DoRA" in capability_refusal(dora, Capability.MIXED_BATCH)
    assert capability_refusal(dora, Capability.MERGE) is None
    with_copies = dt.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    for capability in (Capability.MIXED_BATCH, Capability.HOTSWAP):
        assert "modules_to_save" in capability_refusal(with_copies, capability)
    assert "relu" in capability_refusal(_config("bottleneck"), Capability.MERGE)
    assert capability_refusal(_config("bottleneck_linear"), Capability.MERGE) is None
    assert "virtual tokens" in capability_refusal(_config("prompt"), Capability.MERGE)


@pytest.fixture
def scaled_ia3():
    """IA3 registered again under another name, declaring mixed batches it does not have: callers must
    believe the declaration (and the runtime then checks the layers it can batch)."""

    class ScaledConfig(Ia3Config):
        pass

    class ScaledMethod(Ia3Method):
        config_class = ScaledConfig
        capabilities = frozenset()
        lacks = {Capability.MERGE: "scaled adapters are kept apart on purpose"}

    register("SCALED_TEST")(ScaledMethod)
    yield ScaledConfig
    del _METHODS["SCALED_TEST"]


def test_a_new_method_is_judged_by_its_declaration(scaled_ia3):
    model = build_llama()
    dt.inject(model, scaled_ia3(target_modules=["q_proj"], init_ia3_weights=False))
    with pytest.raises(dt.MergeError, match="kept apart on purpose"):
        dt.merge(model)
    assert "SCALED_TEST adapters cannot share a mixed-adapter batch" in mixable_refusal(model, "default")


def test_ia3_config_is_also_spelled_as_peft_spells_it():
    assert dt.IA3Config is Ia3Config
    model = build_llama()
    dt.inject(model, dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    assert dt.adapter_configs(model)["default"].peft_type == "IA3"


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_a_declared_shared_prefix_scores_as_the_whole_rows(variant):
    """Declared: the rows' common prompt prefix run once gives the loss the whole rows give. Not declared:
    evaluation and a training config both run without it, the config naming the method's own reason."""
    from types import SimpleNamespace

    from deltatune.data.formats import IGNORE
    from deltatune.task.loss import task_loss
    from deltatune.task.shared_prefix import shared_prefix_length, shares_in_evaluation, unavailable

    model = build_llama()
    config = _config(variant)
    dt.inject(model, config)
    cfg = SimpleNamespace(
        model=SimpleNamespace(task="causal_lm"),
        adapter=SimpleNamespace(method=config.peft_type.lower(), full=False),
        training=SimpleNamespace(shared_prefix=True, gradient_checkpointing=False, kl_penalty=0.0),
    )
    reason = capability_refusal(config, Capability.SHARE_PREFIX)
    if reason is not None:
        assert not shares_in_evaluation(cfg, model) and unavailable(cfg, distributed=False) == reason
        return
    assert shares_in_evaluation(cfg, model) and unavailable(cfg, distributed=False) is None
    generator = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, 96, (1, 12), generator=generator).expand(3, -1)
    ids = torch.cat([prefix, torch.randint(0, 96, (3, 6), generator=generator)], dim=1)
    labels = ids.clone()
    labels[:, :12] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert shared_prefix_length(batch) > 0
    with torch.no_grad():
        shared, count, _ = task_loss(model, batch, False, fuse_head=False, share_prefix=True)
        whole, whole_count, _ = task_loss(model, batch, False, fuse_head=False, share_prefix=False)
    assert count == whole_count == 18
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_a_declared_checkpointed_method_gets_the_gradients_it_gets_without(variant):
    """Declared: with activations recomputed in the backward pass, the adapter's gradients are those of the
    plain backward. Not declared: a training config asking for checkpointing is refused with the reason."""
    from deltatune.task.config import ConfigError, validate_config
    from deltatune.train.setup import enable_gradient_checkpointing

    config = _config(variant)
    reason = capability_refusal(config, Capability.CHECKPOINTED)
    if reason is not None:
        raw = {
            "model": {"path": "unused"}, "data": {"train": "unused.jsonl", "format": "text"},
            "adapter": {"method": config.peft_type.lower()},
            "training": {"max_steps": 1, "gradient_checkpointing": True},
            "output_dir": "unused",
        }  # fmt: skip
        with pytest.raises(ConfigError, match=f"cannot use training.gradient_checkpointing: {reason}"):
            validate_config(raw)
        return
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_llama()
        dt.inject(model, _config(variant))
        if checkpointed:
            enable_gradient_checkpointing(model)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)
