"""Prompt and prefix tuning on encoder-decoder models (T5, BART, mBART), against PEFT 0.21.2.

Prompt tuning: the virtual tokens go in front of the encoder's input (PEFT keeps a second, unused set for the
decoder: num_transformer_submodules 2); logits, padded rows included, and greedy `generate` equal PEFT's both
ways. Prefix tuning: the prefix goes into the decoder's self-attention cache only, in PEFT's layer layout;
logits equal PEFT's both ways, and `generate` equals greedy decoding by repeated forward calls (PEFT's own
`generate` drops the prefix on transformers 5.24: it hands it over as `past_key_values`, and transformers
prefers the empty `cache` that `generate` passes). Both train; eject restores the model; what cannot work is
refused with the reason."""

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


def _ours_read_by_peft(arch, model, inputs, tmp_path):
    """Our adapter saved and loaded by PEFT gives our logits; returns PEFT's model."""
    dt.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(arch.build(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs, inputs), _logits(model, inputs))
    return theirs


def _peft_read_by_us(arch, config, inputs, tmp_path, **load):
    """PEFT's adapter (initialised under seed 2) saved and loaded by us gives PEFT's logits; returns our model."""
    torch.manual_seed(2)
    theirs = peft.get_peft_model(arch.build(), config).eval()
    expected = _logits(theirs, inputs)
    theirs.save_pretrained(tmp_path / "theirs")
    model = arch.build()
    dt.load_adapter(model, tmp_path / "theirs", **load)
    torch.testing.assert_close(_logits(model, inputs), expected)
    return model


@pytest.mark.parametrize("name", ["t5", "bart", "mbart"])
def test_prompt_tuning_on_an_encoder_decoder_matches_peft_both_ways(name, tmp_path):
    arch, inputs = BY_NAME[name], _inputs(BY_NAME[name])
    model = arch.build()
    base = _logits(model, inputs)
    torch.manual_seed(1)
    dt.inject(model, dt.PromptTuningConfig(num_virtual_tokens=3))
    ours = _logits(model, inputs)
    assert ours.shape == base.shape and not torch.allclose(ours, base)  # decoder logits, moved
    theirs = _ours_read_by_peft(arch, model, inputs, tmp_path)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["num_transformer_submodules"] == 2 and saved["task_type"] == "SEQ_2_SEQ_LM"
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    settings = {"max_new_tokens": 6, "do_sample": False}
    expected = theirs.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **settings), expected)

    config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)
    model = _peft_read_by_us(arch, config, inputs, tmp_path)
    dt.eject(model, merge=False)
    torch.testing.assert_close(_logits(model, inputs), base)
    assert not model._forward_pre_hooks_with_kwargs and not model.get_encoder()._forward_pre_hooks_with_kwargs


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # PEFT 0.21.2's forward
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_prefix_tuning_on_an_encoder_decoder_matches_peft_both_ways(name, tmp_path):
    arch, inputs = BY_NAME[name], _inputs(BY_NAME[name])
    model = arch.build()
    base = _logits(model, inputs)
    torch.manual_seed(1)
    dt.inject(model, dt.PrefixTuningConfig(num_virtual_tokens=3))
    ours = _logits(model, inputs)
    assert not torch.allclose(ours, base)
    _ours_read_by_peft(arch, model, inputs, tmp_path)

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    decoded = torch.full((2, 1), model.config.decoder_start_token_id)
    for _ in range(generated.shape[1] - 1):  # greedy by full forward calls, without a cache: the reference
        logits = _logits(model, {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoded})
        decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, decoded)

    config = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)
    model = _peft_read_by_us(arch, config, inputs, tmp_path, is_trainable=True)
    model(**inputs, labels=inputs["decoder_input_ids"]).loss.backward()
    assert model.get_input_embeddings().prefix_embeddings["default"].grad.abs().sum() > 0


def test_the_prefix_changes_what_t5_generates():
    """So the generate comparison above can fail: on T5 the prefix changes the greedy tokens."""
    arch, inputs = BY_NAME["t5"], _inputs(BY_NAME["t5"])
    settings = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                "max_new_tokens": 5, "do_sample": False}  # fmt: skip
    plain = arch.build().generate(**settings)
    model = arch.build()
    torch.manual_seed(1)
    dt.inject(model, dt.PrefixTuningConfig(num_virtual_tokens=3))
    assert not torch.equal(model.generate(**settings), plain)


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
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_what_cannot_work_on_an_encoder_decoder_is_refused_with_the_reason():
    whisper = BY_NAME["whisper"].build()
    with pytest.raises(dt.TargetingError, match="encoder reads no token ids"):
        dt.inject(whisper, dt.PromptTuningConfig(num_virtual_tokens=2))
    assert not any(isinstance(m, AdapterLayer) for m in whisper.modules())  # refused before any change
    with pytest.raises(dt.AdapterConfigError, match="is an encoder-decoder model .* made for another model"):
        dt.inject(
            BY_NAME["bart"].build(), dt.PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=1)
        )
