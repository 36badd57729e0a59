"""Prompt tuning on encoder-decoder models (T5, BART, mBART), against PEFT 0.21.2: the virtual tokens go in
front of the encoder's input (PEFT keeps a second, unused set for the decoder: num_transformer_submodules 2);
the logits, padded rows included, and greedy `generate` equal PEFT's both ways; it trains; eject restores the
model; what cannot work is refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from architectures import ARCHITECTURES

import deltatune as dt
from deltatune.core.layer import AdapterLayer

peft = pytest.importorskip("peft")
BY_NAME = {a.name: a for a in ARCHITECTURES}


def _inputs(arch):
    inputs = arch.inputs()
    mask = torch.ones_like(inputs["input_ids"])
    mask[1, :3] = 0  # a left-padded row: the virtual tokens stay visible to it
    return inputs | {"attention_mask": mask}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", ["t5", "bart", "mbart"])
def test_prompt_tuning_on_an_encoder_decoder_matches_peft_both_ways(name, tmp_path):
    arch, inputs = BY_NAME[name], _inputs(BY_NAME[name])
    model = arch.build()
    base = _logits(model, inputs)
    torch.manual_seed(1)
    dt.inject(model, dt.PromptTuningConfig(num_virtual_tokens=3))
    ours = _logits(model, inputs)
    assert ours.shape == base.shape and not torch.allclose(ours, base)  # decoder logits, moved
    dt.save_adapter(model, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["num_transformer_submodules"] == 2 and saved["task_type"] == "SEQ_2_SEQ_LM"
    theirs = peft.PeftModel.from_pretrained(arch.build(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs, inputs), ours)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    settings = {"max_new_tokens": 6, "do_sample": False}
    expected = theirs.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **settings), expected)

    torch.manual_seed(2)
    config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)
    theirs = peft.get_peft_model(arch.build(), config).eval()
    expected = _logits(theirs, inputs)
    theirs.save_pretrained(tmp_path / "theirs")
    model = arch.build()
    dt.load_adapter(model, tmp_path / "theirs")
    torch.testing.assert_close(_logits(model, inputs), expected)
    dt.eject(model, merge=False)
    torch.testing.assert_close(_logits(model, inputs), base)
    assert not model._forward_pre_hooks_with_kwargs and not model.get_encoder()._forward_pre_hooks_with_kwargs


def test_prompt_tuning_trains_a_t5():
    arch = BY_NAME["t5"]
    inputs = _inputs(arch)
    model = arch.build()
    dt.inject(model, dt.PromptTuningConfig(num_virtual_tokens=4))
    prompt = model.get_input_embeddings().prompt_embeddings["default"]
    optimizer = torch.optim.AdamW([prompt], lr=5e-2)
    losses = []
    for _ in range(8):
        loss = model(**inputs, labels=inputs["decoder_input_ids"]).loss
        loss.backward()
        assert (
            prompt.grad[:4].abs().sum() > 0 and prompt.grad[4:].abs().sum() == 0
        )  # PEFT's decoder set: unused
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_what_cannot_work_on_an_encoder_decoder_is_refused_with_the_reason():
    whisper = BY_NAME["whisper"].build()
    with pytest.raises(dt.TargetingError, match="encoder reads no token ids"):
        dt.inject(whisper, dt.PromptTuningConfig(num_virtual_tokens=2))
    assert not any(isinstance(m, AdapterLayer) for m in whisper.modules())  # refused before any change
    with pytest.raises(
        dt.TargetingError, match="T5ForConditionalGeneration is an encoder-decoder model; .* prefix"
    ):
        dt.inject(BY_NAME["t5"].build(), dt.PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(dt.AdapterConfigError, match="is an encoder-decoder model .* made for another model"):
        dt.inject(
            BY_NAME["bart"].build(), dt.PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=1)
        )
