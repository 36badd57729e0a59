"""training.kl_penalty: the KL is torch's KL divergence on the same distributions, it is zero where the model
is still its base, it covers the prompt's tokens and not the answer's, and a run with it ends nearer its base
on general text than the same run without it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from train_helpers import causal_config, instruction_rows, write_jsonl

from deltatune.task.kl import text_batches, token_divergence, token_kl
from deltatune.train import train, validate_config


def test_token_kl_is_torchs_kl_divergence():
    g = torch.Generator().manual_seed(0)
    adapted, base = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    keep = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    want = F.kl_div(
        F.log_softmax(adapted[keep], -1),
        F.log_softmax(base[keep], -1),
        log_target=True,
        reduction="batchmean",
    )
    assert float(token_kl(adapted, base, keep)) == pytest.approx(float(want), rel=1e-6)
    assert float(token_kl(base, base, keep)) == pytest.approx(0.0, abs=1e-7)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", instruction_rows(120, 5))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    texts = ["the movie was long and the day was so sad", "my phone is a very good phone today"] * 8
    path = tmp_path_factory.mktemp("corpus") / "general.txt"
    path.write_text("\n".join(texts) + "\n")
    return path


def _run(tiny_causal_lm, data, out, **training):
    raw = causal_config(tiny_causal_lm, data, out, max_steps=20, **training)
    raw["optim"]["lr"] = 2e-2
    raw["training"]["log_every"] = 1
    return train(validate_config(raw))


def _kl_on(tiny_causal_lm, adapter, corpus) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.core.io import load_adapter

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    load_adapter(model, adapter)
    batches = text_batches(tokenizer, corpus.read_text().splitlines(), 32, batch_size=8)
    return float(token_divergence(model.eval(), batches)["kl"].mean())


@pytest.mark.slow
def test_a_run_with_the_penalty_ends_nearer_its_base(tiny_causal_lm, data, corpus, tmp_path):
    plain = _run(tiny_causal_lm, data, tmp_path / "plain")
    held = _run(tiny_causal_lm, data, tmp_path / "held", kl_penalty=1.0, kl_penalty_texts=4,
                kl_penalty_corpus=str(corpus))  # fmt: skip
    drift_plain, drift_held = (
        _kl_on(tiny_causal_lm, plain.saved_to, corpus),
        _kl_on(tiny_causal_lm, held.saved_to, corpus),
    )
    assert drift_held < 0.5 * drift_plain, (drift_plain, drift_held)
    logged = [json.loads(line) for line in (tmp_path / "held" / "metrics.jsonl").read_text().splitlines()]
    first = logged[0]
    # LoRA starts as the base: no KL, and the loss is the task loss alone
    assert first["kl_to_base"] == 0.0 and first["kl_to_base_general"] == 0.0
    assert first["loss"] == pytest.approx(first["task_loss"], abs=1e-7)
    later = [r for r in logged if r["split"] == "train"][-1]
    assert later["kl_to_base"] > 0 and later["loss"] == pytest.approx(
        later["task_loss"] + later["kl_to_base"] + later["kl_to_base_general"], rel=1e-5
    )


def test_the_penalty_leaves_the_answer_tokens_free(tiny_causal_lm, data, monkeypatch):
    """Only positions whose next token is prompt text enter the KL."""
    from deltatune.train import kl_penalty as module

    seen = {}
    real = module.token_kl

    def spy(adapted, base, keep):
        seen["keep"] = keep.clone()
        return real(adapted, base, keep)

    monkeypatch.setattr(module, "token_kl", spy)
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    labels = torch.tensor([[-100, -100, -100, 7, 8, -100], [-100, -100, 5, 6, 9, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    ids = torch.tensor([[3, 4, 5, 7, 8, 0], [3, 4, 5, 6, 9, 4]])
    cfg = validate_config(causal_config(tiny_causal_lm, data, "/tmp/unused", kl_penalty=0.5))
    module.KLPenalty(cfg.training, None).task_loss(
        model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, share_prefix=False
    )
    assert seen["keep"].tolist() == [[True, True, False, False, False], [True, False, False, False, False]]


def test_prompts_left_free_hold_the_model_on_general_texts_alone(tiny_causal_lm, data, corpus, tmp_path):
    """kl_penalty_prompts=false: the batch's loss is the plain next-token loss (its shared prefix kept), the
    penalty the general texts' KL alone; without general texts there is nothing to penalise, said up front."""
    import deltatune as dt
    from deltatune.task.loss import task_loss
    from deltatune.task.shared_prefix import unavailable
    from deltatune.train import kl_penalty as module

    with pytest.raises(ValueError, match="kl_penalty_texts to how many general texts"):
        validate_config(
            causal_config(tiny_causal_lm, data, "/tmp/unused", kl_penalty=0.5, kl_penalty_prompts=False)
        )
    cfg = validate_config(
        causal_config(
            tiny_causal_lm,
            data,
            "/tmp/unused",
            kl_penalty=0.5,
            kl_penalty_prompts=False,
            kl_penalty_texts=2,
            kl_penalty_corpus=str(corpus),
        )  # fmt: skip
    )
    assert unavailable(cfg, distributed=False) is None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    labels = torch.tensor([[-100, -100, -100, 7, 8, -100], [-100, -100, 5, 6, 9, 4]])
    batch = {"input_ids": torch.tensor([[3, 4, 5, 7, 8, 0], [3, 4, 5, 6, 9, 4]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]), "labels": labels}  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    loss, parts = module.KLPenalty(cfg.training, tokenizer).task_loss(model, batch, share_prefix=False)
    loss_sum, count, _ = task_loss(model, batch, False, share_prefix=False)
    assert float(loss) == pytest.approx(float(loss_sum / count), abs=1e-7)
    assert parts == {"task_loss": pytest.approx(float(loss))}

    raw = causal_config(tiny_causal_lm, data, tmp_path / "free", max_steps=4, kl_penalty=1.0,
                        kl_penalty_prompts=False, kl_penalty_texts=2, kl_penalty_corpus=str(corpus))  # fmt: skip
    raw["optim"]["lr"] = 2e-2
    raw["training"]["log_every"] = 1
    train(validate_config(raw))
    logged = [json.loads(line) for line in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if r["split"] == "train"][-1]
    assert "kl_to_base" not in last and last["kl_to_base_general"] > 0
    assert last["loss"] == pytest.approx(last["task_loss"] + last["kl_to_base_general"], rel=1e-5)
