"""IA3 beyond the contract suite: its exact formula, config checks, unsupported layers, and training."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from train_helpers import causal_config, instruction_rows, write_jsonl

import deltatune as dt
from deltatune.methods.ia3 import Ia3Config


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down, self.embed = nn.Linear(4, 6), nn.Linear(6, 3), nn.Embedding(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_formula_output_and_input_scaling():
    model, reference = Mlp(), Mlp()
    dt.inject(model, Ia3Config(target_modules=["up", "down"], feedforward_modules=["down"]))
    up, down = model.up, model.down
    with torch.no_grad():
        up.ia3_l["default"].copy_(torch.linspace(0.5, 2, 6).reshape(6, 1))
        down.ia3_l["default"].copy_(torch.linspace(2, 0.5, 6).reshape(1, 6))
    assert up.ia3_l["default"].shape == (6, 1) and down.ia3_l["default"].shape == (1, 6)  # PEFT's shapes
    x = torch.randn(7, 4)
    hidden = torch.relu(reference.up(x) * torch.linspace(0.5, 2, 6))  # output (and bias) scaled
    expected = reference.down(hidden * torch.linspace(2, 0.5, 6))  # input scaled
    torch.testing.assert_close(model(x), expected)
    exported = Mlp()  # the merged export carries the scaled bias too (the Mlp's biases are non-zero)
    exported.load_state_dict(dt.merged_state_dict(model))
    torch.testing.assert_close(exported(x), expected, atol=1e-6, rtol=1e-5)
    dt.merge(model)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(up.base_layer.bias, reference.up.bias * torch.linspace(0.5, 2, 6))
    torch.testing.assert_close(down.base_layer.bias, reference.down.bias)  # input scaling leaves the bias


def test_two_active_adapters_multiply():
    model = Mlp()
    dt.inject(model, Ia3Config(target_modules=["up"]), adapter_name="a")
    dt.inject(model, Ia3Config(target_modules=["up"]), adapter_name="b")
    with torch.no_grad():
        model.up.ia3_l["a"].fill_(2.0)
        model.up.ia3_l["b"].fill_(3.0)
    dt.set_adapter(model, ["a", "b"])
    x = torch.randn(2, 4)
    torch.testing.assert_close(model.up(x), 6.0 * model.up.base_layer(x))


def test_config_and_targeting_errors():
    with pytest.raises(
        dt.AdapterConfigError, match=r"feedforward_modules \['down'\] are not in target_modules"
    ):
        Ia3Config(target_modules=["up"], feedforward_modules=["down"])
    with pytest.raises(
        dt.TargetingError, match="of type Embedding, which this method cannot wrap .*it supports nn.Linear"
    ):
        dt.inject(Mlp(), Ia3Config(target_modules=["embed"]))


def test_unmerge_refuses_zero_scaling():
    model = Mlp()
    dt.inject(model, Ia3Config(target_modules=["up"]))
    with torch.no_grad():
        model.up.ia3_l["default"][0] = 0.0
    dt.merge(model)
    with pytest.raises(dt.MergeError, match="zero scaling entries, so its merge cannot be undone"):
        dt.unmerge(model)


@pytest.mark.slow
def test_ia3_trains_through_the_pipeline(tiny_causal_lm, tmp_path):
    from deltatune.train import evaluate_adapter, train, validate_config

    data = write_jsonl(tmp_path / "d.jsonl", instruction_rows(200, 0))
    raw = causal_config(tiny_causal_lm, data, tmp_path / "run", max_steps=40)
    raw["adapter"] = {"method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                      "feedforward_modules": ["down_proj"]}  # fmt: skip
    raw["optim"]["lr"] = 5e-2
    cfg = validate_config(raw)
    before = evaluate_adapter(cfg, None)["loss"]
    result = train(cfg)
    assert result.trainable.trainable == 2 * (16 + 16 + 64)  # 2 layers: k (16 out), v (16 out), down (64 in)
    assert result.validation["loss"] < 0.9 * before, (before, result.validation["loss"])


def test_lora_and_ia3_on_different_layers_work_together(tmp_path):
    model, reference = Mlp(), Mlp()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["up"], init_lora_weights=False), adapter_name="lora")
    dt.inject(model, Ia3Config(target_modules=["down"], feedforward_modules=["down"]), adapter_name="ia3")
    with torch.no_grad():
        model.down.ia3_l["ia3"].fill_(1.5)
    dt.set_adapter(model, ["lora", "ia3"])
    x = torch.randn(3, 4)
    up = model.up
    a, b = up.lora_A["lora"].weight, up.lora_B["lora"].weight
    hidden = torch.relu(reference.up(x) + up.scaling["lora"] * x @ a.t() @ b.t())
    torch.testing.assert_close(model(x), reference.down(hidden * 1.5))
    for name in ("lora", "ia3"):
        dt.save_adapter(model, tmp_path / name, adapter_name=name)
    fresh = Mlp()
    dt.load_adapter(fresh, tmp_path / "lora", adapter_name="lora")
    dt.load_adapter(fresh, tmp_path / "ia3", adapter_name="ia3")
    dt.set_adapter(fresh, ["lora", "ia3"])
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(
        dt.TargetingError, match=r"'up' is already wrapped by LoraLinear .*one method per layer"
    ):
        dt.inject(model, Ia3Config(target_modules=["up"]), adapter_name="more")
    with pytest.raises(dt.TargetingError, match="already wrapped by LoraLinear"):
        dt.inject(model, Ia3Config(target_modules="all-linear"), adapter_name="more")
