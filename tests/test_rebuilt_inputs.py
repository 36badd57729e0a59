"""LoRA's fused kernel rebuilds a norm's output and a gated MLP's product in backward instead of saving them:
the gradients are bit-identical, and the step saves no more activations than the frozen model does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.core import rebuilt_inputs
from deltatune.core.rebuilt_inputs import forget_rebuildable
from deltatune.train.setup import enable_gradient_checkpointing


def _tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    return model


def _lora(model: nn.Module, **kwargs) -> nn.Module:
    options = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False) | kwargs
    return dt.inject(model, dt.LoraConfig(**options))


def _pair(**kwargs) -> tuple[nn.Module, nn.Module]:
    """Two identical all-linear LoRA models; the second saves its inputs as before (no rebuild hooks)."""
    rebuilt = _lora(_tiny_llama(), **kwargs)
    saved = copy.deepcopy(rebuilt)
    forget_rebuildable(saved)
    return rebuilt, saved


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))


def _grads(model: nn.Module, autocast: bool = False) -> dict[str, torch.Tensor]:
    model.train()
    ids = _ids()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def adoptions(monkeypatch) -> list[str]:
    """The function each adopted rebuild will run: 'forward' for a norm, 'mul' for a gated product."""
    seen: list[str] = []
    adopt = rebuilt_inputs.Rebuild.adopt

    def counting(self):
        seen.append(getattr(self.recompute.fn, "__name__", "?"))
        return adopt(self)

    monkeypatch.setattr(rebuilt_inputs.Rebuild, "adopt", counting)
    return seen


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_gradients_are_bit_identical_and_every_rebuildable_input_is_rebuilt(adoptions):
    rebuilt, saved = _pair()
    _assert_equal(_grads(rebuilt), _grads(saved))
    # Per block: q, k, v read the first norm, gate and up the second, down the product. Block 0's first norm
    # reads the embedding output, which needs no grad: its norm keeps nothing, so q, k, v save their input.
    assert adoptions.count("forward") == 3 + 2 * 2
    assert adoptions.count("mul") == 2


def test_the_step_saves_no_activation_the_frozen_model_does_not(adoptions):
    """Bytes of distinct non-parameter storages autograd saves in one forward: all-linear LoRA adds only its
    (tokens x r) products; saving the inputs would add every norm output and every down-projection input."""

    def saved_bytes(model: nn.Module) -> int:
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}
        kept = []  # alive until counted, so no address is reused

        def pack(t):
            kept.append(t)
            pointer = t.untyped_storage().data_ptr()
            if pointer not in parameters:
                storages[pointer] = t.untyped_storage().nbytes()
            return t

        model.train()
        ids = _ids()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids).loss.backward()
        return sum(storages.values())

    floor = _tiny_llama()
    floor.enable_input_require_grads()
    rebuilt, saved = _pair()
    tokens, r, layers_per_block, blocks = 2 * 11, 4, 7, 2
    products = tokens * r * 4 * layers_per_block * blocks  # the saved h = x A^T, float32
    # (the floor's block-0 norm, reading an embedding output that needs grad, also keeps its (tokens, 1) rsqrt)
    assert saved_bytes(rebuilt) - saved_bytes(floor) == products - tokens * 4
    hidden, intermediate = 32, 48
    inputs = tokens * 4 * (2 * hidden + intermediate) * blocks  # two norm outputs and one product per block
    assert saved_bytes(saved) - saved_bytes(rebuilt) == inputs - tokens * 4 * hidden  # block 0's first norm
    assert adoptions


def test_under_gradient_checkpointing_and_bf16_autocast(adoptions):
    rebuilt, saved = _pair()
    for model in (rebuilt, saved):
        enable_gradient_checkpointing(model)  # the trainer's switch: non-reentrant
    _assert_equal(_grads(rebuilt), _grads(saved))
    assert adoptions
    rebuilt, saved = _pair()
    _assert_equal(_grads(rebuilt, autocast=True), _grads(saved, autocast=True))


def test_dropout_and_other_hooks_fall_back_to_saving_the_input(adoptions):
    """With dropout the kernel needs the dropped-out input; a norm with a hook of its own may not output
    norm(input). Both save x, and the gradients still match the reference."""
    rebuilt, saved = _pair(lora_dropout=0.2)
    torch.manual_seed(5)
    first = _grads(rebuilt)
    torch.manual_seed(5)
    _assert_equal(first, _grads(saved))
    assert adoptions == []

    rebuilt, saved = _pair()
    doubled = lambda module, args, output: output * 2  # noqa: E731
    for model in (rebuilt, saved):
        for layer in model.model.layers:
            layer.post_attention_layernorm.register_forward_hook(doubled)
    _assert_equal(_grads(rebuilt), _grads(saved))
    assert "forward" in adoptions and len(adoptions) == 3 + 2  # only the first norms (and the products)


class _NormThenLinear(nn.Module):
    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.in_place = in_place

    def forward(self, x):
        h = self.norm(x)
        if self.in_place:
            h.mul_(3)  # changes the norm's output after it was tagged
        return self.proj(h)


@pytest.mark.parametrize("in_place", [False, True])
def test_an_output_changed_in_place_is_not_rebuilt(in_place, adoptions):
    torch.manual_seed(0)
    model = _NormThenLinear(in_place).requires_grad_(False)
    _lora(model, target_modules=["proj"])
    reference = copy.deepcopy(model)
    forget_rebuildable(reference)
    x = torch.randn(3, 8)
    grads = []
    for m in (model, reference):
        m(x.clone().requires_grad_(True)).square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    _assert_equal(*grads)
    assert adoptions == ([] if in_place else ["forward"])


def test_eject_removes_the_hooks_and_a_copy_keeps_working(adoptions):
    model = _lora(_tiny_llama())
    copied = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    forget_rebuildable(reference)
    _assert_equal(_grads(copied), _grads(reference))
    assert adoptions

    dt.eject(model)
    hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert hooks == []


def test_nothing_is_recorded_without_grad(adoptions):
    model = _lora(_tiny_llama())
    ids = _ids()
    with torch.no_grad():
        model(input_ids=ids)
    with torch.inference_mode():
        model(input_ids=ids)
    assert adoptions == []
    assert rebuilt_inputs._scope_stack() == []  # every scope the MLPs opened was closed


@pytest.mark.slow
def test_the_hooks_do_not_break_a_whole_model_compile(adoptions):
    """torch.compile(fullgraph=True) traces the hooked model in one graph (the hooks step aside while Dynamo
    traces), and its gradients equal eager mode's."""
    model = _lora(_tiny_llama())
    eager = _grads(copy.deepcopy(model))
    compiled = torch.compile(model, fullgraph=True)
    ids = _ids()
    compiled(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == eager.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager[name], rtol=1e-4, atol=1e-6)
    assert rebuilt_inputs._scope_stack() == []


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_the_module_hooks_exist_only_while_the_model_trains(adoptions):
    """Inference pays one root pre-hook per forward, not the ~8 per block that training uses."""
    model = _lora(_tiny_llama())
    ids = _ids()
    assert _hook_count(model) == 1  # the root's, which follows the mode
    model.train()
    model(input_ids=ids, labels=ids)
    per_block = 2 + 2 + 1 + 3  # two norms; the MLP's scope; its activation; gate, up, down
    assert _hook_count(model) == 1 + 2 * per_block + 1  # and the final norm
    model.eval()
    model(input_ids=ids)
    assert _hook_count(model) == 1
    with torch.no_grad():
        model.train()(input_ids=ids)
    assert _hook_count(model) == 1
    _assert_equal(_grads(model), _grads(_pair()[1]))  # hooked again when it trains, and still exact
    assert adoptions
