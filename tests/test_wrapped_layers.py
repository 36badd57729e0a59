"""A wrapper behaves like the layer it wraps for every read a model makes of it: T5's feed-forward casts to
`self.wo.weight.dtype`, which failed at the first forward with LoRA or IA3 on `wo`; now T5 trains and matches
PEFT both ways. A layer whose weight a model uses without calling it (nn.MultiheadAttention's out_proj, as in
SigLIP's pooling head) is left out of all-linear and refused by name with the reason."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.errors import TargetingError
from deltatune.methods.ia3 import Ia3Config

peft = pytest.importorskip("peft")
TOL = {"atol": 1e-5, "rtol": 1e-4}


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=96, d_model=32, d_ff=48, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=2
    )
    return T5ForConditionalGeneration(config).eval()


def _twins():
    model, twin = _t5(), _t5()
    twin.load_state_dict(copy.deepcopy(model.state_dict()))
    return model, twin


INPUTS = {
    "input_ids": torch.arange(14).reshape(2, 7) % 96,
    "decoder_input_ids": torch.arange(8).reshape(2, 4),
}


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS).logits


def test_a_wrapper_answers_what_its_layer_would():
    model = _t5()
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    dt.inject(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["wo"]))
    wrapper = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert wrapper is not wo and wrapper.base_layer is wo
    assert wrapper.weight is wo.weight and wrapper.bias is wo.bias is None
    assert (wrapper.in_features, wrapper.out_features) == (48, 32)
    assert isinstance(wrapper.lora_A, nn.ModuleDict)  # its own state first
    with pytest.raises(AttributeError, match="no_such_thing"):
        wrapper.no_such_thing  # noqa: B018


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_t5_with_its_feed_forward_wrapped_matches_peft_both_ways(method, tmp_path):
    if method == "lora":
        ours_config = dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        theirs_config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False
        )
    else:
        targets, feedforward = ["k", "v", "wo"], ["wo"]
        ours_config = Ia3Config(
            target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False
        )
        theirs_config = peft.IA3Config(
            target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False
        )
    model, base = _twins()
    torch.manual_seed(1)
    dt.inject(model, ours_config)
    ours = _logits(model)  # the first forward: it raised AttributeError on `wo.weight`
    assert not torch.allclose(ours, _logits(_t5()))
    dt.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs), ours, **TOL)

    model, base = _twins()
    torch.manual_seed(2)
    theirs = peft.get_peft_model(model, theirs_config).eval()
    expected = _logits(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    dt.load_adapter(base, tmp_path / "theirs")
    torch.testing.assert_close(_logits(base.eval()), expected, **TOL)


def test_t5_trains_through_its_wrapped_feed_forward():
    model = _t5().train()
    dt.inject(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    loss = model(**INPUTS, labels=INPUTS["decoder_input_ids"]).loss
    loss.backward()
    wo = model.decoder.block[1].layer[2].DenseReluDense.wo
    assert wo.lora_B["default"].weight.grad.abs().sum() > 0 and wo.base_layer.weight.grad is None


class Pooled(nn.Module):
    """SigLIP's pooling head in miniature: a query attends over the tokens through nn.MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.probe = nn.Parameter(torch.randn(1, 1, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.attention(self.probe.expand(len(x), -1, -1), x, x)[0]


def test_an_uncalled_layer_is_left_out_of_all_linear_and_refused_by_name():
    model = Pooled()
    preview = dt.preview_targets(model, dt.LoraConfig(r=2, target_modules="all-linear"))
    assert list(preview.targets) == ["proj"]  # not attention.out_proj, and the preview says why
    assert "left out: attention.out_proj: MultiheadAttention passes out_proj's weight" in str(preview)
    for spec in (["out_proj"], ["proj", "attention.out_proj"], ".*proj"):
        with pytest.raises(TargetingError, match=r"'attention.out_proj' cannot be adapted: MultiheadAttention "
                           r"passes out_proj's weight to its functional attention .* selects it"):  # fmt: skip
            dt.inject(Pooled(), dt.LoraConfig(r=2, target_modules=spec))
    excluded = dt.LoraConfig(r=2, target_modules=".*proj", exclude_modules=["out_proj"])
    dt.inject(model, excluded)  # left out by the user: fine


def test_siglip_all_linear_leaves_its_pooling_heads_out_proj_alone():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                image_size=8, patch_size=4)  # fmt: skip
    model = SiglipVisionModel(config).eval()
    dt.inject(model, dt.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    names = {n for n, _ in dt.core.adapters.adapter_layers(model)}
    assert "head.mlp.fc1" in names and not any(n.endswith("head.attention.out_proj") for n in names)
    pixels = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pooled = model(pixel_values=pixels).pooler_output
    assert pooled.shape == (1, 32) and torch.isfinite(pooled).all()
