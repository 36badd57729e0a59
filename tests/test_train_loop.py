"""The training loop on tiny local models: it learns, writes its outputs, keeps the best weights, stops early,
stops on a non-finite loss, and mixed precision / gradient checkpointing / full fine-tuning work."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import causal_config, instruction_rows, sentiment_rows, write_jsonl

from deltatune.train import NonFiniteLossError, evaluate_adapter, train, validate_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", instruction_rows(240, 0))


def config(tiny_causal_lm, data, out, **training):
    return causal_config(tiny_causal_lm, data, out, **training)


@pytest.mark.slow
def test_lora_training_lowers_held_out_loss_and_touches_only_the_adapter(tiny_causal_lm, data, tmp_path):
    raw = config(tiny_causal_lm, data, tmp_path / "run", max_steps=40)
    raw["optim"]["lr"] = 2e-2
    cfg = validate_config(raw)
    before = evaluate_adapter(cfg, None)["loss"]
    result = train(cfg)
    after = evaluate_adapter(cfg, result.saved_to)["loss"]
    assert after < 0.6 * before, (before, after)  # ln(vocab) ~ 6 -> well under 3.6
    assert after == pytest.approx(result.validation["loss"], rel=1e-5)  # eval CLI path == in-loop eval
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} >= {
        "adapter",
        "checkpoints",
        "config.yaml",
        "curves.png",
        "metrics.jsonl",
    }
    assert validate_config(__import__("yaml").safe_load((out / "config.yaml").read_text())) == cfg
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "validation"] == [6, 12, 18, 24, 30, 36, 40]
    assert all(r["tokens_per_s"] > 0 for r in records if r["split"] == "train")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    provenance = json.loads((result.saved_to / "deltatune.json").read_text())
    assert provenance["metrics"]["step"] == result.best_step
    assert provenance["training_config"]["optim"]["lr"] == 2e-2 and len(provenance["data_sha256"]) == 64
    # The frozen base is untouched: checkpoints hold only LoRA tensors.
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    assert all(".lora_" in k for k in load_file(ckpt / "trainable.safetensors"))


def test_best_weights_are_kept_and_patience_stops_the_run(tiny_causal_lm, data, tmp_path, monkeypatch):
    from deltatune.train import loop

    sequence = iter([3.0, 2.0, 2.5, 2.6, 1.0])
    saved_at = []
    monkeypatch.setattr(loop.Trainer, "_evaluate", lambda self, step: {"loss": next(sequence)})
    original_save = loop.Trainer._save_weights
    monkeypatch.setattr(
        loop.Trainer,
        "_save_weights",
        lambda self, step, m: (saved_at.append(step), original_save(self, step, m)),
    )
    raw = config(tiny_causal_lm, data, tmp_path / "run", max_steps=50)
    raw["eval"] |= {"every": 2, "early_stopping_patience": 2}
    result = train(validate_config(raw))
    assert result.stopped_early and result.steps == 8
    assert (result.best_step, result.best_metric) == (4, 2.0)
    assert saved_at == [2, 4]
    assert json.loads((result.saved_to / "deltatune.json").read_text())["metrics"]["step"] == 4


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(
    tiny_causal_lm, data, tmp_path, monkeypatch
):
    from deltatune.task import loss as ev
    from deltatune.train import loop

    calls = {"n": 0}
    real = ev.task_loss

    def poisoned(model, batch, classification, **options):
        calls["n"] += 1
        loss, count, logits = real(model, batch, classification, **options)
        return (loss * float("nan") if calls["n"] == 5 else loss), count, logits

    monkeypatch.setattr(loop, "task_loss", poisoned)
    raw = config(tiny_causal_lm, data, tmp_path / "run", max_steps=10, checkpoint_every=2)
    raw["eval"]["every"] = None
    with pytest.raises(
        NonFiniteLossError,
        match=r"training loss \(sft objective\) is nan at step 5; stopped\. the last good checkpoint is .*step-00000004",
    ):
        train(validate_config(raw))
    assert (tmp_path / "run" / "checkpoints" / "step-00000004" / "meta.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_gradient_checkpointing_run(tiny_causal_lm, data, tmp_path, precision):
    raw = config(
        tiny_causal_lm, data, tmp_path / "run", max_steps=6, precision=precision, gradient_checkpointing=True
    )
    raw["optim"]["lr"] = 2e-2
    result = train(validate_config(raw))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert result.steps == 6 and all(map(math.isfinite, losses))
    assert losses[-1] < losses[0]  # it trains, not just runs
    adapter = load_file(result.saved_to / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in adapter.values())  # autocast leaves the weights in fp32


def test_gradient_checkpointing_gives_the_same_gradients_with_frozen_embeddings(tiny_causal_lm):
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.train.setup import enable_gradient_checkpointing

    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
        torch.manual_seed(0)  # same random LoRA init in both models
        dt.inject(model, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.is_gradient_checkpointing
        model.train()
        ids = torch.arange(2, 26).reshape(2, 12)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert not model.model.embed_tokens.weight.requires_grad
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)
    assert all(
        g.abs().sum() > 0 for n, g in grads[1].items() if "lora_B" in n
    )  # B starts at 0: A gets none yet


@pytest.mark.slow
def test_classification_lora_and_full_fine_tuning_learn_the_rule(tiny_bert, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(400, 0))
    accuracies = {}
    for method in ("lora", "full"):
        adapter = {"method": "full"} if method == "full" else {
            "method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value", "dense"]}  # fmt: skip
        raw = {
            "model": {"path": str(tiny_bert), "task": "classification"},
            "data": {"train": str(data), "format": "classification", "max_length": 32},
            "adapter": adapter,
            "optim": {"lr": 3e-3 if method == "lora" else 1e-3},
            "training": {"max_steps": 300, "batch_size": 16, "progress": False},
            "eval": {"every": 30, "metric": "accuracy"},
            "output_dir": str(tmp_path / method),
        }
        result = train(validate_config(raw))
        accuracies[method] = result.validation["accuracy"]
        assert result.validation["f1"] > 0.8, (method, result.validation)  # chance: 0.5
        if method == "lora":  # the randomly initialised head trains in full (modules_to_save)
            saved = load_file(result.saved_to / "adapter_model.safetensors")
            assert any("classifier.modules_to_save" in k or "classifier" in k for k in saved)
            assert result.trainable.percent < 50
        else:
            from transformers import AutoModelForSequenceClassification

            reloaded = AutoModelForSequenceClassification.from_pretrained(result.saved_to)
            assert reloaded.config.id2label == {0: "negative", 1: "positive"}
            record = json.loads((result.saved_to / "deltatune.json").read_text())
            assert (
                record["schema_version"] == 1 and record["method"] == "full"
            )  # the same record as an adapter's
            assert record["data_sha256"] and record["environment"]["torch"] and record["metrics"]["step"] > 0
    assert min(accuracies.values()) > 0.8, accuracies  # chance 0.5; measured 0.90 (LoRA), 1.0 (full)


def test_trimmed_and_fused_heads_give_the_same_loss_and_gradients(tiny_causal_lm):
    """The three ways task_loss runs the output head: on every position, on the labelled tail
    (logits_to_keep), and fused with the loss on the labelled positions only (task/head_loss.py)."""
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.data.formats import Example
    from deltatune.task.batching import collate
    from deltatune.task.loss import task_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    torch.manual_seed(0)
    dt.inject(model, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    examples = [  # answers start at different positions; right padding
        Example(list(range(5, 25)), [-100] * 14 + list(range(19, 25))),
        Example(list(range(7, 19)), [-100] * 9 + list(range(16, 19))),
    ]
    batch = collate(examples, pad_id=0, classification=False)
    results = {}
    for path, options in {
        "full": dict(fuse_head=False, trim_logits=False),
        "trimmed": dict(fuse_head=False, trim_logits=True),
        "fused": {},
    }.items():
        model.zero_grad()
        loss, count, logits = task_loss(model, batch, False, **options)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results[path] = (loss.detach(), count, None if logits is None else logits.shape[1], grads)
    full, width_full = results["full"], results["full"][2]
    assert results["trimmed"][2] < width_full  # the head really ran on fewer positions
    assert results["fused"][2] is None  # and here kept no logits at all
    # the fused path sums the head's input gradient in another order: ~1e-5 relative on a few elements
    for path, (rtol, atol) in {"trimmed": (1e-5, 1e-7), "fused": (1e-4, 1e-6)}.items():
        loss, count, _, grads = results[path]
        assert count == full[1] == 9
        torch.testing.assert_close(loss, full[0], rtol=1e-6, atol=1e-6)
        for a, b in zip(full[3], grads, strict=True):
            assert a.abs().max() > 0
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "mode, values", [("max", [0.5, 0.7, 0.6, 0.65, 0.7]), ("min", [2.0, 1.5, 1.7, 1.6, 1.5])]
)
def test_run_state_judges_improvement_and_patience(mode, values):
    """An evaluation is kept only when strictly better than the best so far; `patience` evaluations in a
    row without one stop the run. Ties do not count as better."""
    from deltatune.train.loop import RunState

    state = RunState()
    kept = [state.judge(step, {"m": v, "loss": 1.0}, "m", mode, 3) for step, v in enumerate(values, 1)]
    assert kept == [True, True, False, False, False]
    assert (state.best, state.best_step, state.bad_evals, state.stopped_early) == (values[1], 2, 3, True)
    assert state.best_metrics == {"m": values[1], "loss": 1.0}
    assert RunState(**state.to_dict()) == state  # what a checkpoint stores and restores
    never = RunState()
    for step in range(1, 20):
        never.judge(step, {"m": 1.0}, "m", mode, None)  # no patience: never stops early
    assert not never.stopped_early and never.bad_evals == 18


def test_adamw_is_torch_fused_for_plain_parameters_on_one_device(tiny_causal_lm, data, tmp_path):
    """The fused AdamW kernel (one pass over all adapter tensors) for ordinary parameters; the default loop
    for anything else (here: a parameter on the meta device; FSDP's DTensors in tests/test_fsdp.py)."""
    from deltatune.train.loop import build_optimizer

    cfg = validate_config(config(tiny_causal_lm, data, tmp_path / "run", max_steps=1))
    plain = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(4))]
    assert build_optimizer(cfg, plain).defaults["fused"] is True
    odd = plain + [torch.nn.Parameter(torch.zeros(2, device="meta"))]
    assert not build_optimizer(cfg, odd).defaults["fused"]
