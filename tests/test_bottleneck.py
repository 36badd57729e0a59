"""Bottleneck adapters beyond the contract suite: the formula, placement presets, exact linear merge with
biases, stacking order, and the refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES

import deltatune as dt

TOL = {"atol": 1e-5, "rtol": 1e-4}


def _targets(model, **kwargs) -> list[str]:
    return list(dt.preview_targets(model, dt.BottleneckConfig(**kwargs)).targets)


def test_formula_on_the_layer_output():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 6)
    model = torch.nn.Sequential(linear)
    reference = torch.nn.Linear(8, 6)
    reference.load_state_dict(linear.state_dict())
    dt.inject(
        model,
        dt.BottleneckConfig(
            target_modules=["0"], bottleneck_size=3, non_linearity="gelu", init_weights=False
        ),
    )
    layer = model[0]
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    assert (down.in_features, down.out_features, up.out_features) == (6, 3, 6)
    x = torch.randn(4, 8)
    h = reference(x)
    torch.testing.assert_close(model(x), h + up(torch.nn.functional.gelu(down(h))))
    keys = set(dt.core.state.adapter_state_dict(model, "default"))
    assert keys == {f"base_model.model.0.adapter_{p}.{t}" for p in ("down", "up") for t in ("weight", "bias")}


def test_new_adapter_is_the_identity_and_reduction_factor_sets_the_width():
    model = CASES["llama"].build()  # hidden 32
    dt.inject(model, dt.BottleneckConfig(reduction_factor=8))
    layer = model.model.layers[0].mlp.down_proj
    assert layer.adapter_down["default"].out_features == 4
    assert torch.count_nonzero(layer.adapter_up["default"].weight) == 0


@pytest.mark.parametrize(
    ("name", "placement", "expected"),
    [
        ("llama", "attention", ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]),
        ("llama", "feedforward", ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]),
        ("gpt2", "both", ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
                          "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]),
        ("bert", "feedforward", ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]),
        ("bert", "attention", ["bert.encoder.layer.0.attention.output.dense",
                               "bert.encoder.layer.1.attention.output.dense"]),
    ],
)  # fmt: skip
def test_placement_presets(name, placement, expected):
    assert _targets(CASES[name].build(), placement=placement) == expected


def test_unknown_architecture_and_bad_values_are_refused():
    with pytest.raises(dt.TargetingError, match="no preset .* name the output projections in target_modules"):
        dt.inject(CASES["cnn"].build(), dt.BottleneckConfig())
    with pytest.raises(dt.AdapterConfigError, match="placement must be one of"):
        dt.BottleneckConfig(placement="everywhere")
    with pytest.raises(dt.AdapterConfigError, match="non_linearity must be one of"):
        dt.BottleneckConfig(non_linearity="softmax")
    with pytest.raises(dt.TargetingError, match="of type Conv2d, which this method cannot wrap"):
        dt.inject(CASES["cnn"].build(), dt.BottleneckConfig(target_modules=["conv"]))


def test_linear_adapter_with_biases_merges_exactly_into_conv1d_with_bias():
    case = CASES["gpt2"]  # Conv1D output projections with (random) biases
    model = case.build()
    inputs = case.inputs()
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    dt.inject(model, dt.BottleneckConfig(non_linearity="identity", init_weights=False, reduction_factor=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_down" in name and name.endswith("bias"):
                param.normal_(0, 0.5)
    adapted = model(**inputs).logits
    assert dt.merge(model) == ["default"]
    torch.testing.assert_close(model(**inputs).logits, adapted, **TOL)
    dt.unmerge(model)
    plain = dt.eject(model, merge=False)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, pristine[key], **TOL)


def test_stacked_adapters_apply_in_activation_order_and_merge_to_the_same():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6))
    for name in ("a", "b"):
        dt.inject(model, dt.BottleneckConfig(target_modules=["0"], bottleneck_size=2, non_linearity="identity",
                                             init_weights=False), adapter_name=name)  # fmt: skip
    dt.set_adapter(model, ["a", "b"])
    layer, x = model[0], torch.randn(3, 6)

    def adapter(name, h):
        return h + layer.adapter_up[name](layer.adapter_down[name](h))

    expected = adapter("b", adapter("a", layer.base_layer(x)))
    torch.testing.assert_close(model(x), expected)
    dt.merge(model)
    torch.testing.assert_close(model(x), expected, **TOL)


def test_merge_refusals_say_why():
    model = CASES["llama"].build()  # o_proj / down_proj have no bias
    dt.inject(model, dt.BottleneckConfig(), adapter_name="relu")
    with pytest.raises(
        dt.MergeError, match=r"'relu' cannot be merged .*non-linearity \(relu\) is not linear"
    ):
        dt.merge(model)
    dt.delete_adapter(model, "relu")
    dt.inject(model, dt.BottleneckConfig(non_linearity="identity"), adapter_name="biased")
    with pytest.raises(dt.MergeError, match="base layer has none to fold them into"):
        dt.merge(model)
    dt.delete_adapter(model, "biased")
    dt.inject(model, dt.BottleneckConfig(non_linearity="identity", use_bias=False), adapter_name="linear")
    assert dt.merge(model) == ["linear"]
