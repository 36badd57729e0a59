"""The real bundled SmolLM2-135M-Instruct: converted from the packaged GGUF, loaded from a local folder
through the normal `from_pretrained` path, adapted, saved, reloaded, and read by PEFT."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.models import smollm2_path

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    return path, tokenizer, load


def test_smollm2_adapter_round_trip_and_peft_interop(smollm2, tmp_path):
    peft = pytest.importorskip("peft")
    path, tokenizer, load = smollm2
    model = load()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True
    )
    batch = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        base = model(**batch).logits
    torch.manual_seed(0)  # the random adapter must not depend on which tests ran before (its greedy answer
    # below would then end early at end-of-sequence in some orders)
    config = dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    assert len(dt.preview_targets(model, config).targets) == 60
    dt.inject(model, config)
    summary = dt.trainable_summary(model)
    assert 0.05 < summary.percent < 1.0
    with torch.no_grad():
        adapted = model(**batch).logits
        with dt.disable_adapter(model):
            assert torch.equal(model(**batch).logits, base)
    assert (adapted - base).abs().max() > 1e-2
    dt.save_adapter(model, tmp_path / "a", tokenizer=tokenizer)
    size = (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    assert size < 2.5e6  # 60 modules x (8x576 + 576x8 or 192x8) floats

    fresh = load()
    dt.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, adapted)
    # Logits reach ~30 in magnitude; 30 fp32 layers summed in another order differ by ~1e-4 (~4e-6 relative).
    tol = {"atol": 5e-4, "rtol": 1e-4}
    theirs = peft.PeftModel.from_pretrained(load(), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, adapted, **tol)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dt.export_merged(model, tmp_path / "merged", tokenizer=tokenizer)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    exported_batch = AutoTokenizer.from_pretrained(tmp_path / "merged")(prompt, return_tensors="pt")
    assert torch.equal(exported_batch["input_ids"], batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(exported(**exported_batch).logits, adapted, **tol)
    del exported

    dt.merge(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, adapted, **tol)
        out = fresh.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4
