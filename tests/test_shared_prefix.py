"""training.shared_prefix: the leading tokens every row shares run once per batch, and the loss, its gradients
and a whole training run stay those of the full rows (float32 rounding apart)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_llama
from safetensors.torch import load_file
from train_helpers import causal_config, instruction_rows, write_config, write_jsonl

import deltatune as dt
from deltatune.data.formats import IGNORE
from deltatune.task.loss import task_loss
from deltatune.task.shared_prefix import MIN_SHARED, shared_prefix_length, unavailable
from deltatune.train import load_train_config, train, validate_config


def ragged_batch(prefix: int = 12, rows: int = 4) -> dict[str, torch.Tensor]:
    """Rows of 20-27 tokens that share their first `prefix`, right-padded, labelled on the last 5 tokens."""
    g = torch.Generator().manual_seed(0)
    width = prefix + 15
    ids = torch.randint(1, 96, (rows, width), generator=g)
    ids[:, :prefix] = torch.randint(1, 96, (prefix,), generator=g)
    mask = torch.ones(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE)
    for row, length in enumerate(range(width, width - rows * 2, -2)):
        mask[row, length:] = 0
        ids[row, length:] = 0
        labels[row, length - 5 : length] = ids[row, length - 5 : length]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora_llama():
    model = build_llama()
    dt.inject(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model.train()


def loss_and_grads(model, batch, share_prefix: bool):
    model.zero_grad()
    loss, count, _ = task_loss(model, batch, False, share_prefix=share_prefix)
    loss.backward()
    return loss.item(), count, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_shared_prefix_gives_the_full_rows_loss_and_gradients():
    model, batch = lora_llama(), ragged_batch()
    assert shared_prefix_length(batch) == 11  # the 12 shared tokens less the one whose logits the rows need
    full, shared = loss_and_grads(model, batch, False), loss_and_grads(model, batch, True)
    assert shared[1] == full[1] == 20
    assert abs(shared[0] - full[0]) <= 1e-5 * abs(full[0])
    for name, grad in full[2].items():
        assert grad.abs().max() > 0, name  # every adapter weight gets a gradient, so the check below bites
        torch.testing.assert_close(shared[2][name], grad, atol=1e-5, rtol=1e-4)


def test_only_unpadded_unlabelled_tokens_all_rows_share_count():
    batch = ragged_batch(prefix=12)
    batch["labels"][2, 10] = batch["input_ids"][2, 10]  # a label inside the common prefix ends it there
    assert shared_prefix_length(batch) == 9
    batch["attention_mask"][1, 9] = 0  # so does padding
    assert shared_prefix_length(batch) == MIN_SHARED
    assert shared_prefix_length(ragged_batch(prefix=MIN_SHARED)) == 0  # too short to pay for a second call
    one_row = {k: v[:1] for k, v in ragged_batch().items()}
    assert shared_prefix_length(one_row) == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = instruction_rows(80, 5)
    for row in rows:  # a long instruction every row shares, as a chat template and system prompt make
        row["instruction"] = (
            "Read the text below and reply with its sentiment as a JSON object. " + row["instruction"]
        )
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


def _run(tmp_path, model, data, name: str, shared: bool, loss_every: int | None) -> tuple[dict, list[dict]]:
    raw = causal_config(model, data, tmp_path / name, max_steps=6, shared_prefix=shared)
    raw["data"]["max_length"] = 192
    raw["eval"] = {"every": None, "loss_every": loss_every, "batch_size": 8}
    train(load_train_config(write_config(tmp_path / f"{name}.yaml", raw)))
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors"), records


@pytest.mark.slow
def test_a_run_with_shared_prefixes_ends_where_the_plain_run_ends(
    tmp_path, tiny_causal_lm, data, monkeypatch
):
    """Training and the validation loss both share the prefix, and both equal the plain run's."""
    from deltatune.task import loss as evaluate_module

    shared_lengths, real = [], evaluate_module.continuation
    monkeypatch.setattr(evaluate_module, "continuation", lambda *a: shared_lengths.append(a[2]) or real(*a))
    plain, plain_log = _run(tmp_path, tiny_causal_lm, data, "plain", False, loss_every=2)
    assert not shared_lengths
    shared, shared_log = _run(tmp_path, tiny_causal_lm, data, "shared", True, loss_every=2)
    # 6 training steps, and 4 validation losses (steps 0, 2, 4, 6) over 16 rows in batches of 8
    assert len(shared_lengths) == 6 + 4 * 2 and min(shared_lengths) >= MIN_SHARED
    for key, want in plain.items():
        torch.testing.assert_close(shared[key], want, atol=1e-5, rtol=1e-4)
    evals = {name: [r for r in log if r["split"] == "validation"] for name, log in (("plain", plain_log),
             ("shared", shared_log))}  # fmt: skip
    assert [r["step"] for r in evals["shared"]] == [0, 2, 4, 6] == [r["step"] for r in evals["plain"]]
    for a, b in zip(evals["plain"], evals["shared"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"]
    assert evals["plain"][-1]["loss"] < evals["plain"][0]["loss"]  # the curve the user watches falls


@pytest.mark.slow
def test_validation_losses_between_evaluations_change_nothing_else(tmp_path, tiny_causal_lm, data):
    """eval.loss_every only adds records: the same weights, bit for bit, and the best is still the final
    evaluation's, where `eval.every` is not set."""
    with_curve, log = _run(tmp_path, tiny_causal_lm, data, "curve", True, loss_every=2)
    without, _ = _run(tmp_path, tiny_causal_lm, data, "none", True, loss_every=None)
    assert with_curve.keys() == without.keys()
    assert all(torch.equal(with_curve[k], without[k]) for k in without)
    summary = json.loads((tmp_path / "curve" / "summary.json").read_text())
    assert summary["best_step"] == 6
    evals = [r for r in log if r["split"] == "validation"]
    assert [(r["step"], r.get("loss_only", False)) for r in evals] == [
        (0, True),
        (2, True),
        (4, True),
        (6, False),
    ]


@pytest.mark.parametrize(
    "change, distributed, reason",
    [
        ({}, False, None),
        ({"training": {"gradient_checkpointing": True}}, False, "gradient checkpointing"),
        ({"adapter": {"method": "prompt_tuning", "num_virtual_tokens": 4}}, False, "virtual tokens"),
        ({}, True, "DDP and FSDP"),
    ],
)
def test_runs_that_cannot_share_a_prefix_run_without_it(
    tmp_path, tiny_causal_lm, data, change, distributed, reason
):
    """Such a run trains as if the option were off and says why: a config that shares its prefix can still be
    reused for another method, with checkpointing, or under torchrun."""
    raw = causal_config(tiny_causal_lm, data, tmp_path / "run", max_steps=2, shared_prefix=True)
    for section, values in change.items():
        raw[section] = values if section == "adapter" else raw[section] | values
    why = unavailable(validate_config(raw), distributed)
    assert why is None if reason is None else reason in why


@pytest.mark.slow
def test_deltatune_eval_shares_the_prefix_unless_the_adapter_brings_virtual_tokens(
    tmp_path, tiny_causal_lm, data, monkeypatch
):
    """`evaluate_adapter` (deltatune eval) shares the prefix as the config asks, with the same loss; an adapter
    whose virtual tokens go in front is evaluated on whole rows, whatever the config's own method says."""
    from transformers import AutoModelForCausalLM

    from deltatune.task import loss as evaluate_module
    from deltatune.train import evaluate_adapter

    _run(tmp_path, tiny_causal_lm, data, "lora", True, loss_every=None)
    calls, real = [], evaluate_module.continuation
    monkeypatch.setattr(evaluate_module, "continuation", lambda *a: calls.append(a[2]) or real(*a))
    sharing = load_train_config(tmp_path / "lora.yaml")  # a LoRA config with training.shared_prefix: true
    plain = load_train_config(tmp_path / "lora.yaml", ["training.shared_prefix=false"])

    shared_loss = evaluate_adapter(sharing, tmp_path / "lora" / "adapter")["loss"]
    assert calls
    calls.clear()
    plain_loss = evaluate_adapter(plain, tmp_path / "lora" / "adapter")["loss"]
    assert not calls and abs(shared_loss - plain_loss) <= 1e-5 * plain_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    dt.inject(model, dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    dt.save_adapter(model, tmp_path / "prompt")
    prompt_loss = evaluate_adapter(sharing, tmp_path / "prompt")["loss"]
    assert not calls
    assert prompt_loss == evaluate_adapter(plain, tmp_path / "prompt")["loss"]
