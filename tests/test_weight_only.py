"""Weight-only int8 / int4 bases for inference (runtime.weight_only): each packed layer computes x W^T with W
its own dequantized weight, within half a quantization step of the float weight; adapters load onto a packed
base and run as on a float one (the lean path, mixed batches); the engine's greedy tokens are transformers'
`generate` on the same packed model; what cannot run is refused by name."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import build_llama
from test_decode import assert_mixed_rows_score_as_alone
from torch import nn

import deltatune as dt
from deltatune.core.errors import DeltatuneWarning
from deltatune.core.quantized import float_weight, is_quantized, model_quantization
from deltatune.runtime import generate
from deltatune.runtime.weight_only import (
    Int4Linear,
    Int8Linear,
    PackedLinear,
    WeightQuantizationUnsupported,
    check_scheme,
    quantize_weights,
)


def _linear(out: int, inner: int, dtype=torch.bfloat16, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(inner, out, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.2, 5.0, out, dtype=dtype)[:, None])  # rows of different ranges
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_rows_are_within_half_a_step_and_the_kernel_multiplies_by_them(dtype, bias):
    source = _linear(48, 64, dtype, bias)
    packed = Int8Linear(source)
    w = source.weight.float()
    deq = packed.dequantized()
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((deq - w).abs() <= 0.5 * step * 1.02).all()  # (the scale itself rounded to the half dtype)
    assert packed.weight.dtype == torch.int8 and packed.weight.abs().max() == 127
    x = torch.randn(5, 7, 64).to(dtype)
    expected = x.float() @ deq.t() + (0 if not bias else source.bias.float())
    out = packed(x)
    assert out.shape == (5, 7, 48) and out.dtype == dtype
    assert torch.allclose(out.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_groups_are_within_half_a_step_and_the_kernel_multiplies_by_them(group_size):
    source = _linear(48, 128)
    packed = Int4Linear(source, group_size)
    w = source.weight.float()
    groups = w.view(48, -1, group_size)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(group_size, dim=1)
    deq = packed.dequantized()
    assert ((deq - w).abs() <= 0.5 * step * 1.05 + 1e-3).all()
    assert packed.dequantized().shape == (48, 128) and packed.weight.numel() == 48 * 128 // 2  # 4 bits each
    x = torch.randn(3, 128).bfloat16()
    expected = x.float() @ deq.t()
    assert torch.allclose(packed(x).float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_a_float32_input_is_multiplied_in_the_layers_dtype_and_given_back_in_float32():
    packed = Int8Linear(_linear(16, 32))
    x = torch.randn(2, 32)
    out = packed(x)
    assert out.dtype == torch.float32 and torch.equal(out, packed(x.bfloat16()).float())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_packed_layer_cast_to_another_dtype_multiplies_in_it(scheme):
    """`.to(dtype)` casts the scales (never the packed integers); the kernel's dtype is read off them, so the
    layer computes in the new dtype, by the same dequantized weight up to the scales' rounding."""
    source = _linear(48, 64)
    packed = Int8Linear(source) if scheme == "int8" else Int4Linear(source, 32)
    before = packed.dequantized()
    packed.to(torch.float32)
    assert packed.compute_dtype == torch.float32 and packed.weight.dtype in (torch.int8, torch.uint8)
    x = torch.randn(3, 64)
    out = packed(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, x @ packed.dequantized().t(), atol=1e-4)
    assert torch.equal(packed.dequantized(), before)  # bf16 scales are exact in float32


def _packed_llama(scheme: str, hidden: int = 64, spread: bool = False) -> nn.Module:
    """The test Llama in bf16, packed; `spread`: its scores spread past bf16's noise (a random model's are
    nearly uniform, and two paths that round in different places would pick different near-ties)."""
    model = build_llama(hidden).to(torch.bfloat16).requires_grad_(False)
    if spread:
        model.lm_head.weight.data *= 40
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeltatuneWarning)  # int4 leaves the 48-input down_proj out
        quantize_weights(model, scheme)
    return model


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_every_linear_layer_is_packed_and_the_logits_stay_near_the_half_models(scheme):
    half = build_llama(64).to(torch.bfloat16)
    model = _packed_llama(scheme)
    packed = {n for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    linears = {n for n, m in half.named_modules() if type(m) is nn.Linear}
    expected_out = {n for n in linears if n.endswith("down_proj")} if scheme == "int4" else set()
    assert packed == linears - expected_out and "lm_head" in packed
    assert all(is_quantized(model.get_submodule(n)) for n in packed)
    assert type(model.lm_head) is Int8Linear  # under int4 too: the head keeps 8 bits
    assert type(model.model.layers[0].self_attn.q_proj) is (Int8Linear if scheme == "int8" else Int4Linear)
    assert model_quantization(model) == {
        "backend": "torch-packed",
        "scheme": scheme,
        "group_size": 32 if scheme == "int4" else None,
        "head": "int8" if scheme == "int4" else None,
    }
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = half(input_ids=ids).logits.float(), model(input_ids=ids).logits.float()
    relative = (got - want).norm() / want.norm()
    assert relative < (0.03 if scheme == "int8" else 0.2), relative
    assert relative > 0  # (it did quantize)


def test_a_layer_the_scheme_cannot_pack_is_named_and_kept():
    model = build_llama(64).to(torch.bfloat16)
    with pytest.warns(
        DeltatuneWarning, match=r"2 of 15 linear layers stay in bfloat16: .*down_proj \(48 inputs"
    ):
        settings = quantize_weights(model, "int4")
    assert sorted(settings.left_out) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    odd = nn.Sequential(nn.Linear(64, 24)).bfloat16()
    with pytest.warns(DeltatuneWarning, match=r"0 \(24 outputs are not a multiple of 16\)"):
        quantize_weights(odd, "int4")


@pytest.mark.parametrize(
    ("scheme", "device", "dtype", "match"),
    [
        ("int3", "cpu", torch.bfloat16, r"'int3' is not one of int8, int4"),
        ("int8", "cuda", torch.bfloat16, r"this model is on cuda; on a GPU use --dtype bfloat16"),
        ("int8", "cpu", torch.float32, r"bfloat16 or float16 .* use --dtype bfloat16"),
    ],
)
def test_what_the_kernels_cannot_run_is_refused_naming_what_would(scheme, device, dtype, match):
    with pytest.raises(WeightQuantizationUnsupported, match=match):
        check_scheme(scheme, device, dtype)


def test_a_float32_model_or_one_with_adapters_is_refused_and_left_as_it_was():
    model = build_llama(64)
    with pytest.raises(WeightQuantizationUnsupported, match="float16"):
        quantize_weights(model, "int8")
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    half = build_llama(64).to(torch.bfloat16)
    dt.inject(half, dt.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(WeightQuantizationUnsupported, match="quantize the base first"):
        quantize_weights(half, "int8")
    with pytest.raises(WeightQuantizationUnsupported, match="group size 48"):
        quantize_weights(build_llama(64).to(torch.bfloat16), "int4", group_size=48)


def _with_adapters(model: nn.Module, names=("a", "b")) -> nn.Module:
    for seed, name in enumerate(names):
        torch.manual_seed(10 + seed)
        config = dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        dt.inject(model, config, adapter_name=name)
    for (
        parameter_name,
        parameter,
    ) in model.named_parameters():  # float32, as loading keeps them on a half base
        if "lora_" in parameter_name:
            parameter.data = parameter.data.float()
    model.requires_grad_(False)
    return model.eval()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_an_adapter_on_a_packed_base_adds_its_update_to_the_packed_output(scheme):
    model = _with_adapters(_packed_llama(scheme), ("a",))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.packed_base and isinstance(layer.base_layer, PackedLinear)
    x = torch.randn(3, 64).bfloat16()
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    with torch.no_grad():
        lean = layer(x)
        general = (
            layer.base_layer(x)
            + (layer.scaling["a"] * (x.float() @ a.float().t()) @ b.float().t()).bfloat16()
        )
    assert torch.allclose(lean.float(), general.float(), rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.base_layer.register_forward_hook(lambda *_: None)
        hooked = layer(x)  # a hook on the base: the general low-rank path, the same numbers
    assert torch.allclose(hooked.float(), lean.float(), atol=1e-2)
    assert torch.equal(float_weight(layer.base_layer), layer.base_layer.dequantized())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_engine_on_a_packed_base_picks_the_tokens_transformers_scores_highest(scheme):
    """Each greedy token of the engine (its decode steps attend in float32) is the top token of transformers'
    own forward over the whole sequence (bf16 attention) up to bf16's rounding: within 2% of that step's
    score range of the best. A wrong update, scale or packing moves scores by far more."""
    model = _with_adapters(_packed_llama(scheme, spread=True))
    for prompt, adapter in zip(
        [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]], ["a", "b", None], strict=True
    ):
        (ours,) = generate(model, [prompt], [adapter], max_new_tokens=8, pad_token_id=0, eos_token_id=None)
        assert_top_tokens(model, adapter, prompt, ours.tokens)


def assert_top_tokens(model: nn.Module, adapter: str | None, prompt: list[int], tokens: list[int]) -> None:
    """Each of `tokens` is, up to bf16's rounding, the top token of transformers' forward over the whole
    sequence: within 2% of that step's score range of the best, and most of them the very best."""
    with _active(model, adapter), torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :].float()
    chosen = logits.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
    best, spread = logits.amax(-1), logits.amax(-1) - logits.amin(-1)
    assert ((best - chosen) <= 0.02 * spread).all(), (adapter, best - chosen, spread)
    assert (best - chosen == 0).float().mean() >= 0.75


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_mixed_batch_on_a_packed_base_scores_each_row_as_it_alone(scheme):
    """Each row its own adapter (the server's batches), within bf16's precision of the row alone."""
    model = _with_adapters(_packed_llama(scheme, spread=True))
    assert_mixed_rows_score_as_alone(
        model, [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]], ["a", "b", None]
    )


def _active(model: nn.Module, name: str):
    from deltatune.core.adapters import activated, all_wrappers

    return activated([w for _, w in all_wrappers(model)], name)


def test_an_adapter_saved_on_a_float_base_loads_onto_the_packed_one_saying_so(tmp_path):
    trained = _with_adapters(build_llama(64), ("default",))
    folder = dt.save_adapter(trained, tmp_path / "adapter")
    model = _packed_llama("int8")
    with pytest.warns(DeltatuneWarning, match=r"stored as quantized:Int8Linear here but were float32"):
        dt.load_adapter(model, folder)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
        want = trained(input_ids=ids).logits
    assert (got - want).norm() / want.norm() < 0.05


def test_generate_refuses_a_quantized_float32_base_before_loading_it():
    done = subprocess.run(
        [sys.executable, "-m", "deltatune", "generate", "--base", "/nonexistent", "--quantize", "int8", "--dtype",
         "float32"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
    )  # fmt: skip
    assert done.returncode == 2
    assert (
        "--quantize int8 multiplies in bfloat16 or float16" in done.stderr and "Traceback" not in done.stderr
    )
