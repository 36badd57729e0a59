"""The contract every registered method must pass (DESIGN.md rule 10), on four model families.

Adapters start from a non-identity init (init_lora_weights / init_ia3_weights=False) so equalities cannot pass trivially;
`test_adapter_changes_output` guards that assumption. float32 tolerance for merge/export: atol 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    CONTRACT_VARIANTS,
    NON_MERGEABLE_VARIANTS,
    VARIANTS,
    VIRTUAL_TOKEN_VARIANTS,
    lora_config,
    method_config,
    on_device,
)

import deltatune as dt
from deltatune.core.capabilities import Capability, capability_refusal

TOL = {"atol": 1e-5, "rtol": 1e-4}


@pytest.fixture
def case(case, device):
    """The contract holds on every device: each family on the CPU, and on CUDA where there is one."""
    return on_device(case, device)


def test_every_registered_method_has_contract_configs():
    assert set(dt.registered_methods()) <= set(CONTRACT_VARIANTS), "add the new method to CONTRACT_VARIANTS"


def _mergeable(case, variant) -> bool:
    """What the method declares; the merge tests below then hold it to that declaration."""
    return capability_refusal(method_config(case, variant), Capability.MERGE) is None


def test_declared_merge_capability(case, variant):
    assert _mergeable(case, variant) == (variant not in NON_MERGEABLE_VARIANTS)


@pytest.fixture(params=[v for variants in CONTRACT_VARIANTS.values() for v in variants])
def variant(request) -> str:
    return request.param


@pytest.fixture
def setup(case, variant):
    model = case.build()
    inputs = case.inputs()
    with torch.no_grad():
        base = case.run(model, inputs)
    pristine = copy.deepcopy(model.state_dict())
    dt.inject(model, method_config(case, variant))
    return case, model, inputs, base, pristine


def _out(case, model, inputs):
    with torch.no_grad():
        return case.run(model, inputs)


def test_identity_at_default_init(case, variant):
    if variant in VIRTUAL_TOKEN_VARIANTS:
        pytest.skip("virtual tokens change the output from the first step; no init is the identity")
    model = case.build()
    inputs = case.inputs()
    base = _out(case, model, inputs)
    dt.inject(model, method_config(case, variant, identity=True, modules_to_save=None))
    torch.testing.assert_close(_out(case, model, inputs), base, atol=1e-6, rtol=0)


def test_adapter_changes_output(setup):
    case, model, inputs, base, _ = setup
    # Relative to the spread of the base logits: the tiny BERT's are ~5e-3 around its (random) classifier bias,
    # and IA3's rescaling or a bottleneck's update passes through LayerNorms.
    assert (_out(case, model, inputs) - base).abs().max() > 1e-2 * base.std()


def test_disable_gives_base_output_exactly(setup):
    case, model, inputs, base, _ = setup
    with dt.disable_adapter(model):
        assert torch.equal(_out(case, model, inputs), base)
    assert not torch.equal(_out(case, model, inputs), base)


def test_merge_unmerge_eject_agree(setup, variant):
    case, model, inputs, base, pristine = setup
    adapted = _out(case, model, inputs)
    if not _mergeable(case, variant):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for attempt in (lambda: dt.merge(model), lambda: dt.eject(model, merge=True)):
            with pytest.raises(dt.MergeError, match="cannot be merged") as err:
                attempt()
            assert "default" in str(err.value) and ": " in str(err.value)  # names the adapter and why
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed
        assert torch.equal(_out(case, model, inputs), adapted)
        return
    assert dt.merge(model) == ["default"]
    merged = _out(case, model, inputs)
    torch.testing.assert_close(merged, adapted, **TOL)
    assert dt.merge(model) == []  # idempotent: nothing merged twice
    assert torch.equal(_out(case, model, inputs), merged)
    assert dt.unmerge(model) == ["default"]
    torch.testing.assert_close(_out(case, model, inputs), adapted, **TOL)
    plain = dt.eject(model, merge=True)
    assert not any(isinstance(m, dt.core.layer.AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(_out(case, plain, inputs), adapted, **TOL)


def test_eject_without_merge_restores_base(setup):
    case, model, inputs, base, pristine = setup
    plain = dt.eject(model, merge=False)
    assert set(plain.state_dict()) == set(pristine)
    assert torch.equal(_out(case, plain, inputs), base)


def test_save_load_round_trip_is_bit_exact(setup, tmp_path):
    case, model, inputs, base, pristine = setup
    adapted = _out(case, model, inputs)
    dt.save_adapter(model, tmp_path / "adapter")
    fresh = case.build()
    fresh.load_state_dict(pristine)
    dt.load_adapter(fresh, tmp_path / "adapter")
    saved = dt.core.state.adapter_state_dict(model, "default")
    loaded = dt.core.state.adapter_state_dict(fresh, "default")
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(_out(case, fresh, inputs), adapted)


def test_export_merged_loads_without_deltatune(setup, variant, tmp_path):
    case, model, inputs, base, pristine = setup
    adapted = _out(case, model, inputs)
    if not _mergeable(case, variant):
        with pytest.raises(dt.MergeError, match="cannot be exported merged"):
            dt.export_merged(model, tmp_path / "merged")
        assert not (tmp_path / "merged").exists() and list(tmp_path.iterdir()) == []  # nothing half-written
        return
    dt.export_merged(model, tmp_path / "merged")
    if hasattr(model, "save_pretrained"):
        plain, info = type(model).from_pretrained(tmp_path / "merged", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        plain.eval()
    else:
        from safetensors.torch import load_file

        plain = case.build()
        plain.load_state_dict(load_file(tmp_path / "merged" / "model.safetensors"))
    torch.testing.assert_close(_out(case, plain, inputs), adapted, **TOL)
    torch.testing.assert_close(_out(case, model, inputs), adapted, atol=0, rtol=0)  # live model untouched


def test_the_merged_copy_shares_what_the_merge_leaves_alone(setup, variant):
    """The export's copy costs the adapted layers' weights, not a second model; the live model stays as it was
    (values and requires_grad) and the copy's tensors hold the merged values."""
    case, model, inputs, base, pristine = setup
    if not _mergeable(case, variant):
        pytest.skip("nothing to merge")
    from deltatune.core.adapters import adapter_layers
    from deltatune.core.export import merged_model

    model.train()  # a trained-copy module (modules_to_save) must stay trainable in the live model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapted = {name for name, _ in adapter_layers(model)}
    live_storage = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    merged = merged_model(model)

    shared = {k for k, t in merged.state_dict().items() if t.untyped_storage().data_ptr() in live_storage}
    rewritten = {k for k in merged.state_dict() if k.rsplit(".", 1)[0] in adapted}
    assert rewritten and shared == set(merged.state_dict()) - rewritten
    assert not any(p.requires_grad for p in merged.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(_out(case, merged, inputs), _out(case, model.eval(), inputs), **TOL)


def test_optimizer_step_changes_only_adapter_parameters(setup):
    case, model, inputs, base, _ = setup
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".base_layer." not in n and ".original_module." not in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    case.run(model, inputs).float().pow(2).mean().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    adapter_tensors = (
        ".lora_",
        ".ia3_l.",
        ".adapter_down.",
        ".adapter_up.",
        ".prompt_embeddings.",
        ".prefix_",
    )
    assert any(marker in n for n in changed for marker in adapter_tensors)


def test_inject_follows_the_models_train_or_eval_mode(setup):
    """New adapter modules start in training mode in torch; an eval model must not start dropping out."""
    case, model, inputs, base, pristine = setup
    assert not any(m.training for m in case.build().modules())  # the cases build eval models
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def test_dropout_training_forward_matches_eval_when_disabled(case, variant):
    # With dropout live, training outputs are stochastic but the eval output is unchanged by dropout settings.
    if variant not in VARIANTS:
        pytest.skip("only LoRA has adapter dropout")
    model = case.build()
    inputs = case.inputs()
    dt.inject(model, lora_config(case, variant, lora_dropout=0.5))
    assert torch.equal(_out(case, model, inputs), _out(case, model, inputs))  # injected into an eval model
    reference = case.build()
    dt.inject(reference, lora_config(case, variant, lora_dropout=0.0))
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(
        _out(case, model.eval(), inputs), _out(case, reference.eval(), inputs), atol=0, rtol=0
    )
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        noisy = case.run(model, inputs)
    assert not torch.allclose(noisy, _out(case, reference, inputs))


def test_half_precision_base_keeps_float32_adapters(variant):
    from conftest import CASES

    case = CASES["llama"]
    model = case.build().to(torch.bfloat16)
    inputs = case.inputs()
    dt.inject(model, method_config(case, variant))
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    adapted = _out(case, model, inputs)
    assert adapted.dtype == torch.bfloat16
    if _mergeable(CASES["llama"], variant):
        dt.merge(model)
        torch.testing.assert_close(_out(case, model, inputs), adapted, atol=0.1, rtol=0.05)  # bf16 resolution
        dt.unmerge(model)
    model.train()
    case.run(model, inputs).float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
