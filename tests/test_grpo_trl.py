"""TRL is the oracle for GRPO: the same tiny model and LoRA weights, the same prompts, the same fixed
completions (TRL's sampler is replaced by them, so nothing is random) and the same reward function go through
TRL's GRPOTrainer (`_generate_and_score_completions`, then `compute_loss`) and through deltatune's objective
(`GRPOObjective.judge`, then `loss`); the loss, the KL and every adapter gradient agree within 1e-5 for each
loss_type, with and without the KL term, for each way of scaling rewards, on both of deltatune's paths (each
prompt once per group, and whole rows).

The prompts have one length: TRL pads prompts on the left and passes no position ids, so a shorter prompt's
tokens sit at shifted positions there, while deltatune places each token right after its prompt's real tokens
(as the sampler saw it)."""

from __future__ import annotations

import warnings

import pytest
import torch
from train_helpers import lora_start_and_now

from deltatune.core.adapters import set_adapter
from deltatune.core.io import load_adapter
from deltatune.data.formats import IGNORE, Example
from deltatune.runtime.sampling import Completion
from deltatune.task.objectives import SETTINGS
from deltatune.task.rewards import Reward
from deltatune.train.grpo import GRPOObjective
from deltatune.train.preference import REFERENCE_ADAPTER

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
EOS = 3  # the tiny tokenizer's <|im_end|>
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]]
G = 4
# per prompt, G completions: some end at EOS (which is trained on), some run to the length limit
COMPLETIONS = [
    [[20, 21, EOS], [22, EOS], [23, 24, 25, 26], [27, 28, 29, EOS]],
    [[30, EOS], [31, 32, 33, 34], [35, 36, EOS], [37, EOS]],
]
MAX_COMPLETION = 4
REWARDS = {  # completion -> reward, varied within each group; one group with a tie
    (20, 21, EOS): 1.0, (22, EOS): 0.0, (23, 24, 25, 26): 0.5, (27, 28, 29, EOS): 2.0,
    (30, EOS): 1.0, (31, 32, 33, 34): 1.0, (35, 36, EOS): -1.0, (37, EOS): 0.25,
}  # fmt: skip
TOLERANCE = 1e-5
DTYPE = torch.float64


def table_reward(prompts, completions, completion_ids, **kwargs):
    return [REWARDS[tuple(ids)] for ids in completion_ids]


@pytest.fixture(scope="module")
def adapters(tiny_causal_lm, tmp_path_factory):
    """Non-identity LoRA adapters in PEFT's format: `start` (where a continued run began: a reference) and
    `now` (the policy; neither the base nor `start`, so the KL means something)."""
    return lora_start_and_now(tiny_causal_lm, tmp_path_factory.mktemp("grpo-adapters"), TARGETS, (3, 4))


def _set_reference(model, adapters, with_reference: bool) -> None:
    """TRL's reference for a PEFT model is its "ref" adapter, which it loads as a copy of the adapter it was
    given; here it is replaced by `start`, or removed (the reference is then the model with adapters off)."""
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    if with_reference:
        model.load_adapter(adapters / "start", adapter_name="ref")
    model.set_adapter("default")


def _trl_step(tiny_causal_lm, adapters, tmp_path, settings: dict, with_reference: bool):
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, dtype=DTYPE)
    model = PeftModel.from_pretrained(base, adapters / "now", is_trainable=True)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, save_strategy="no",
        per_device_train_batch_size=len(PROMPTS) * G, num_generations=G, max_completion_length=MAX_COMPLETION,
        beta=settings["beta"], loss_type=settings["loss_type"], epsilon=settings["epsilon"],
        scale_rewards=settings["scale_rewards"], mask_truncated_completions=settings["mask_truncated_completions"], temperature=settings["temperature"],
        bf16=False,  # TRL trains in bf16 autocast by default; the oracle runs in float64
    )  # fmt: skip
    rows = [{"prompt": "a"}, {"prompt": "b"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.GRPOTrainer(
            model=model, reward_funcs=[table_reward], args=args, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )  # fmt: skip
    _set_reference(trainer.model, adapters, with_reference)
    prompt_ids = [p for p in PROMPTS for _ in range(G)]
    completion_ids = [c for group in COMPLETIONS for c in group]
    texts = [tokenizer.decode(c) for c in completion_ids]
    trainer._generate = lambda prompts: (prompt_ids, completion_ids, None, texts, None, {}, None, None)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test does not run
    inputs = trainer._generate_and_score_completions([{"prompt": "p"} for _ in prompt_ids])
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, metrics, _lora_grads(trainer.model), inputs


def _lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None or ".default." not in name:
            continue
        grads[name.removeprefix("base_model.model.").replace(".default", "")] = param.grad.detach().clone()
    return grads


def _settings(**given) -> dict:
    settings = {
        name: given.get(name, owners["grpo"]) for name, owners in SETTINGS.items() if "grpo" in owners
    }
    settings["num_generations"], settings["max_completion_length"] = G, MAX_COMPLETION
    settings["epsilon_high"] = settings["epsilon"]
    return settings


def _deltatune_step(tiny_causal_lm, adapters, settings: dict, prompt_once: bool, with_reference: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, dtype=DTYPE)
    load_adapter(model, adapters / "now", is_trainable=True)
    if with_reference:  # training.init_adapter's frozen copy
        load_adapter(model, adapters / "start", REFERENCE_ADAPTER)
        set_adapter(model, "default")
    model.train()
    rows = [Example(list(p), [IGNORE] * len(p), list(p), reference="x", fields={}) for p in PROMPTS]
    objective = GRPOObjective(
        settings, [Reward("table", 1.0, table_reward, ["completion_ids"])], tokenizer, train=rows,
        validation=rows, seed=0, prompt_once=prompt_once, distributed=False,
    )  # fmt: skip
    completions = []
    for group in COMPLETIONS:
        for ids in group:
            stopped = ids[-1] == EOS
            tokens = ids[:-1] if stopped else ids
            completions.append(
                Completion(tokens, "stop" if stopped else "length", 5, stop_token=EOS if stopped else None)
            )
    rollout = objective.judge([0, 1], completions)
    tokens = sum(map(len, rollout.completion_ids))
    out = objective.loss(model, rollout, range(len(PROMPTS)), torch.device("cpu"), dapo_tokens=float(tokens))
    out.loss.backward()
    return out, rollout, _lora_grads(model)


CASES = [
    {"loss_type": "grpo", "beta": 0.0, "scale_rewards": "group", "temperature": 1.0},
    {"loss_type": "grpo", "beta": 0.04, "scale_rewards": "group", "temperature": 0.7},
    {"loss_type": "bnpo", "beta": 0.1, "scale_rewards": "batch", "temperature": 1.0},
    {"loss_type": "dr_grpo", "beta": 0.04, "scale_rewards": "none", "temperature": 1.0},
    {"loss_type": "dapo", "beta": 0.0, "scale_rewards": "group", "temperature": 0.9},
    {"loss_type": "dapo", "beta": 0.2, "scale_rewards": "batch", "temperature": 1.0},
    {
        "loss_type": "bnpo",
        "beta": 0.04,
        "scale_rewards": "group",
        "temperature": 1.0,
        "mask_truncated_completions": True,
    },
]


@pytest.mark.parametrize("with_reference", [False, True], ids=["base-reference", "adapter-reference"])
@pytest.mark.parametrize("prompt_once", [True, False], ids=["prompt-once", "whole-rows"])
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: f"{c['loss_type']}-beta{c['beta']}-{c['scale_rewards']}" + "-masked" * (len(c) > 4),
)
@pytest.mark.slow
def test_grpo_loss_and_gradients_match_trl(
    tiny_causal_lm, adapters, tmp_path, case, prompt_once, with_reference
):
    if with_reference and not case["beta"]:
        pytest.skip("without the KL term there is no reference")
    settings = _settings(epsilon=0.2, **case)
    their_loss, metrics, their_grads, inputs = _trl_step(
        tiny_causal_lm, adapters, tmp_path, settings, with_reference
    )
    out, rollout, grads = _deltatune_step(tiny_causal_lm, adapters, settings, prompt_once, with_reference)

    torch.testing.assert_close(
        rollout.advantages.double(), inputs["advantages"].double(), atol=1e-6, rtol=1e-6
    )
    assert rollout.advantages.abs().sum() > 0  # the groups' rewards differ: there is something to learn
    assert float(out.loss) == pytest.approx(float(their_loss), abs=TOLERANCE)
    if case["beta"]:
        assert out.kl == pytest.approx(metrics["kl"], abs=TOLERANCE)
        assert out.kl > 1e-4  # the adapter moved the policy away from the base
    assert out.clip_region == pytest.approx(metrics["clip_ratio/region_mean"], abs=TOLERANCE)
    assert grads.keys() == their_grads.keys() and grads
    for key in grads:
        torch.testing.assert_close(grads[key], their_grads[key], atol=TOLERANCE, rtol=TOLERANCE,
                                   msg=lambda m, key=key: f"{key}: {m}")  # fmt: skip
    assert any(float(g.abs().max()) > 1e-4 for g in grads.values())  # a gradient that means something
