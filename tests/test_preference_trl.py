"""TRL is the oracle for the preference objectives: the same tiny model, the same LoRA weights and the same
token batch go through deltatune's objective and through TRL's trainer (DPOTrainer, KTOTrainer, and the
experimental ORPOTrainer and CPOTrainer for SimPO); the loss, the chosen and rejected rewards and every adapter
gradient agree within 1e-5. Both of deltatune's paths are checked: each prompt run once per pair, and whole
rows. The reference is the model with its adapters off, or (TRL's "ref" adapter, deltatune's
training.init_adapter) a frozen copy of the adapter the run started from."""

from __future__ import annotations

import warnings

import pytest
import torch
from train_helpers import lora_start_and_now

from deltatune.core.io import load_adapter
from deltatune.data.formats import IGNORE, Example
from deltatune.task.objectives import SETTINGS
from deltatune.train.preference import REFERENCE_ADAPTER, PreferenceObjective, kto_partners

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
# prompt ids, chosen ids, rejected ids: prompts of different lengths, answers of different lengths
PAIRS = [
    ([1, 5, 6, 7, 8, 11, 12], [20, 21, 3], [30, 3]),
    ([1, 9, 10], [40, 3], [41, 42, 43, 3]),
    ([1, 13, 14, 15, 16], [50, 51, 52, 3], [53, 3]),
]
KTO_ROWS = [(p, c, True) for p, c, _ in PAIRS] + [(p, r, False) for p, _, r in PAIRS[:2]]
TOLERANCE = 1e-5
# float64 on both sides: what differs is then the arithmetic, not the order float32 sums in (the prompt-once path
# sums in another order than whole rows; in float32 IPO's squared loss showed 1.6e-5 on a gradient of 0.36)
DTYPE = torch.float64


def _settings(objective: str, **given) -> dict:
    return {
        name: given.get(name, owners[objective]) for name, owners in SETTINGS.items() if objective in owners
    }


@pytest.fixture(scope="module")
def adapters(tiny_causal_lm, tmp_path_factory):
    """A non-identity LoRA adapter (`start`, where a run begins) and the same adapter moved on (`now`), both
    saved in PEFT's format."""
    return lora_start_and_now(tiny_causal_lm, tmp_path_factory.mktemp("adapters"), TARGETS, (1, 2))


def _peft_model(tiny_causal_lm, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, dtype=DTYPE)
    return PeftModel.from_pretrained(base, adapters / "now", is_trainable=True)


def _set_reference(model, adapters, with_reference: bool) -> None:
    """TRL's reference for a PEFT model: its "ref" adapter when there is one (here the starting adapter), else
    the model with adapters off."""
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    if with_reference:
        model.load_adapter(adapters / "start", adapter_name="ref")
    model.set_adapter("default")
    assert ("ref" in model.peft_config) == with_reference


def _trainer(kind: str, model, tokenizer, tmp_path, **settings):
    from datasets import Dataset

    common = dict(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, save_strategy="no",
                  per_device_train_batch_size=len(PAIRS))  # fmt: skip
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dpo":
            args = trl.DPOConfig(**common, **settings)
            trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                     processing_class=tokenizer)  # fmt: skip
        elif kind == "kto":
            rows = [{"prompt": "a", "completion": "b", "label": i % 2 == 0} for i in range(4)]
            args = trl.KTOConfig(**common, **settings)
            trainer = trl.KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                     processing_class=tokenizer)  # fmt: skip
        elif kind == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            trainer = ORPOTrainer(model=model, args=ORPOConfig(**common, **settings),
                                  train_dataset=Dataset.from_list(rows), processing_class=tokenizer)  # fmt: skip
        else:
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            trainer = CPOTrainer(model=model, args=CPOConfig(**common, **settings),
                                 train_dataset=Dataset.from_list(rows), processing_class=tokenizer)  # fmt: skip
    return trainer


def _lora_grads(model) -> dict[str, torch.Tensor]:
    """Adapter gradients by module path and matrix, whatever prefix the model's parameter names carry."""
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None or ".default." not in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".default", "")
        grads[key] = param.grad.detach().clone()
    return grads


def _deltatune_model(tiny_causal_lm, adapters, with_reference: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, dtype=DTYPE)
    load_adapter(model, adapters / "now", is_trainable=True)
    if with_reference:
        load_adapter(model, adapters / "start", REFERENCE_ADAPTER)
        from deltatune.core.adapters import set_adapter

        set_adapter(model, "default")
    model.train()
    return model


def _pair_examples() -> list[Example]:
    return [Example(p + c, [IGNORE] * len(p) + c, list(p), rejected_ids=list(r)) for p, c, r in PAIRS]


def _deltatune_run(model, objective, settings, examples, prompt_once, pad_id=0):
    run = PreferenceObjective(
        objective, settings, pad_id=pad_id, batch_size=len(examples), prompt_once=prompt_once,
        precompute=False, train=examples, validation=examples,
    )  # fmt: skip
    out = run.loss(model, "train", list(range(len(examples))), torch.device("cpu"))
    out.loss.backward()
    return out, _lora_grads(model)


def _assert_same(ours, theirs, tolerance=TOLERANCE):
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        torch.testing.assert_close(
            ours[key], theirs[key], atol=tolerance, rtol=tolerance, msg=lambda m, key=key: f"{key}: {m}"
        )


DPO_CASES = [
    ("dpo", {"beta": 0.1, "loss_type": "sigmoid"}, {"beta": 0.1, "loss_type": ["sigmoid"]}),
    ("dpo", {"beta": 0.5, "loss_type": "hinge"}, {"beta": 0.5, "loss_type": ["hinge"]}),
    ("dpo", {"beta": 0.2, "loss_type": "robust", "label_smoothing": 0.1},
     {"beta": 0.2, "loss_type": ["robust"], "label_smoothing": 0.1}),
    ("ipo", {"beta": 0.3}, {"beta": 0.3, "loss_type": ["ipo"]}),
    # TRL's multi-loss: DPO plus the chosen answers' NLL (RPO), and two pairwise losses weighted
    ("dpo", {"beta": 0.1, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7]},
     {"beta": 0.1, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7]}),
    ("dpo", {"beta": 0.2, "loss_type": ["hinge", "robust"], "loss_weights": [0.3, 1.0], "label_smoothing": 0.1},
     {"beta": 0.2, "loss_type": ["hinge", "robust"], "loss_weights": [0.3, 1.0], "label_smoothing": 0.1}),
]  # fmt: skip


@pytest.mark.parametrize("with_reference", [False, True], ids=["base-reference", "adapter-reference"])
@pytest.mark.parametrize("prompt_once", [True, False], ids=["prompt-once", "whole-rows"])
@pytest.mark.parametrize(("objective", "ours", "theirs"), DPO_CASES, ids=lambda c: str(c)[:24])
def test_dpo_family_matches_trl(
    tiny_causal_lm, adapters, tmp_path, objective, ours, theirs, prompt_once, with_reference
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    trainer = _trainer("dpo", _peft_model(tiny_causal_lm, adapters), tokenizer, tmp_path, **theirs)
    _set_reference(trainer.model, adapters, with_reference)
    inputs = trainer.data_collator(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS]
    )
    trainer.model.train()
    their_loss = trainer.compute_loss(trainer.model, inputs)
    their_loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    model = _deltatune_model(tiny_causal_lm, adapters, with_reference)
    out, grads = _deltatune_run(model, objective, _settings(objective, **ours), _pair_examples(), prompt_once,
                                tokenizer.pad_token_id)  # fmt: skip
    assert float(out.loss) == pytest.approx(float(their_loss), abs=TOLERANCE)
    assert float(out.chosen_rewards.mean()) == pytest.approx(metrics["rewards/chosen"], abs=TOLERANCE)
    assert float(out.rejected_rewards.mean()) == pytest.approx(metrics["rewards/rejected"], abs=TOLERANCE)
    assert metrics["rewards/chosen"] != 0.0  # the policy is not its reference: the comparison means something
    _assert_same(grads, _lora_grads(trainer.model))


def _orpo_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """ORPO's and CPO's collated batch: whole rows per answer, labels -100 on the prompt."""
    width = max(len(p) + max(len(c), len(r)) for p, c, r in PAIRS)
    batch = {}
    for side, pick in (("chosen", 1), ("rejected", 2)):
        ids = torch.full((len(PAIRS), width), pad_id)
        mask = torch.zeros((len(PAIRS), width), dtype=torch.long)
        labels = torch.full((len(PAIRS), width), IGNORE)
        for i, row in enumerate(PAIRS):
            prompt, answer = row[0], row[pick]
            n = len(prompt) + len(answer)
            ids[i, :n] = torch.tensor(prompt + answer)
            mask[i, :n] = 1
            labels[i, len(prompt) : n] = torch.tensor(answer)
        batch |= {f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels}
    width = max(len(p) for p, _, _ in PAIRS)
    batch["prompt_input_ids"] = torch.full((len(PAIRS), width), pad_id)
    batch["prompt_attention_mask"] = torch.zeros((len(PAIRS), width), dtype=torch.long)
    for i, (p, _, _) in enumerate(PAIRS):
        batch["prompt_input_ids"][i, : len(p)] = torch.tensor(p)
        batch["prompt_attention_mask"][i, : len(p)] = 1
    return batch


REFERENCE_FREE_CASES = [
    ("orpo", {"beta": 0.1}, {"beta": 0.1}),
    ("orpo", {"beta": 0.5}, {"beta": 0.5}),
    ("simpo", {"beta": 2.0, "simpo_gamma": 0.5}, {"beta": 2.0, "simpo_gamma": 0.5, "loss_type": "simpo", "cpo_alpha": 0.0}),
    ("simpo", {"beta": 2.5, "simpo_gamma": 1.0, "cpo_alpha": 0.5, "label_smoothing": 0.1},
     {"beta": 2.5, "simpo_gamma": 1.0, "loss_type": "simpo", "cpo_alpha": 0.5, "label_smoothing": 0.1}),
]  # fmt: skip


@pytest.mark.parametrize("prompt_once", [True, False], ids=["prompt-once", "whole-rows"])
@pytest.mark.parametrize(("objective", "ours", "theirs"), REFERENCE_FREE_CASES, ids=lambda c: str(c)[:30])
def test_orpo_and_simpo_match_trl(tiny_causal_lm, adapters, tmp_path, objective, ours, theirs, prompt_once):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    peft_model = _peft_model(tiny_causal_lm, adapters)
    trainer = _trainer(objective if objective == "orpo" else "cpo", peft_model, tokenizer, tmp_path, **theirs)
    _set_reference(trainer.model, adapters, with_reference=False)
    trainer.model.train()
    their_loss, metrics = trainer.get_batch_loss_metrics(trainer.model, _orpo_batch(tokenizer.pad_token_id))
    their_loss.backward()

    model = _deltatune_model(tiny_causal_lm, adapters, with_reference=False)
    out, grads = _deltatune_run(model, objective, _settings(objective, **ours), _pair_examples(), prompt_once,
                                tokenizer.pad_token_id)  # fmt: skip
    assert float(out.loss) == pytest.approx(float(their_loss), abs=TOLERANCE)
    assert float(out.chosen_rewards.mean()) == pytest.approx(float(metrics["rewards/chosen"]), abs=TOLERANCE)
    assert float(out.rejected_rewards.mean()) == pytest.approx(
        float(metrics["rewards/rejected"]), abs=TOLERANCE
    )
    _assert_same(grads, _lora_grads(trainer.model))


@pytest.mark.parametrize("prompt_once", [True, False], ids=["prompt-once", "whole-rows"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)], ids=["equal-weights", "undesirable-weighted"])
def test_kto_matches_trl(tiny_causal_lm, adapters, tmp_path, weights, prompt_once):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    settings = {"beta": 0.1, "desirable_weight": weights[0], "undesirable_weight": weights[1]}
    trainer = _trainer("kto", _peft_model(tiny_causal_lm, adapters), tokenizer, tmp_path, **settings)
    _set_reference(trainer.model, adapters, with_reference=False)
    partners = kto_partners(len(KTO_ROWS), len(KTO_ROWS))
    inputs = trainer.data_collator([
        {"prompt_ids": p, "completion_ids": c, "KL_completion_ids": KTO_ROWS[partners[i]][1], "label": good}
        for i, (p, c, good) in enumerate(KTO_ROWS)
    ])  # fmt: skip
    trainer.model.train()
    their_loss = trainer.compute_loss(trainer.model, inputs)
    their_loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    model = _deltatune_model(tiny_causal_lm, adapters, with_reference=False)
    examples = [Example(p + c, [IGNORE] * len(p) + c, list(p), desirable=good) for p, c, good in KTO_ROWS]
    out, grads = _deltatune_run(model, "kto", _settings("kto", **settings), examples, prompt_once,
                                tokenizer.pad_token_id)  # fmt: skip
    assert float(out.loss) == pytest.approx(float(their_loss), abs=TOLERANCE)
    assert out.extra["kl"] == pytest.approx(metrics["kl"], abs=TOLERANCE)
    assert float(out.chosen_rewards.mean()) == pytest.approx(metrics["rewards/chosen"], abs=TOLERANCE)
    assert float(out.rejected_rewards.mean()) == pytest.approx(metrics["rewards/rejected"], abs=TOLERANCE)
    _assert_same(grads, _lora_grads(trainer.model))
