"""GRPO on the quickstart's real model and data, measured two ways in one process (bench/README §20):

1. Sampling inside a GRPO step against the decode engine alone. The same 4 training tweets x 8 samples (the
   quickstart's SFT adapter, LoRA all-linear r=16, temperature 1, at most 16 new tokens, a seed per sample, so
   both sides draw the same tokens): `runtime.generate` called directly on the model in eval mode, and
   `GRPOObjective.rollout` as the trainer calls it (train-mode model, adapter lookup, eval-mode switch, sampling,
   then decoding and scoring with json_match). Alternated, `--repeats` each; ratio of median tokens/s.
2. A whole GRPO step against TRL's GRPOTrainer with PEFT: the same model, adapter, training tweets, G=8, 4
   prompts (32 completions) a step, 16 new tokens, temperature 1, beta 0, loss dapo, AdamW lr 1e-4 cosine, 10
   seeded steps each; TRL samples with transformers' generate (vLLM does not run on this CPU) and trains in fp32
   without gradient checkpointing, as deltatune does. Reported: median seconds per step (step 1 excluded, a
   warm-up) and the mean reward of each step's samples.

    python bench/grpo_step.py [--steps 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from deltatune.core.adapters import adapter_in_use
from deltatune.core.io import load_adapter
from deltatune.core.modes import eval_mode
from deltatune.data import load_data
from deltatune.models import smollm2_path
from deltatune.runtime.generate import generate
from deltatune.runtime.sampling import Sampling, end_of_sequence_ids
from deltatune.task.loading import load_tokenizer
from deltatune.task.rewards import json_match, load_rewards
from deltatune.train import train, validate_config
from deltatune.train.grpo import GRPOObjective, rollout_seed

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "grpo.yaml"
ADAPTER = ROOT / "outputs" / "quickstart" / "adapter"


def bench_config(out: Path, steps: int) -> dict:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["training"] |= {
        "max_steps": steps,
        "checkpoint_every": None,
        "progress": False,
        "init_adapter": str(ADAPTER),
    }
    raw["eval"] |= {"every": None, "generate_samples": 8}  # the one evaluation at the end: kept short
    raw["output_dir"] = str(out)
    return raw


def sampling(cfg, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(cfg.model)
    splits = load_data(cfg.data, tokenizer, cfg.training.seed)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    load_adapter(model, ADAPTER, is_trainable=True)
    model.train()
    settings = cfg.objective_settings
    objective = GRPOObjective(
        settings, load_rewards(cfg.training.rewards, settings["max_completion_length"]), tokenizer,
        train=splits.train, validation=splits.validation, seed=0, prompt_once=True, distributed=False,
    )  # fmt: skip
    rows, g = [0, 1, 2, 3], settings["num_generations"]
    prompts = [splits.train[r].prompt_ids for r in rows for _ in range(g)]
    seeds = [rollout_seed(0, 0, r, k) for r in rows for k in range(g)]
    eos = end_of_sequence_ids(model, tokenizer)

    def engine() -> int:
        with torch.no_grad(), eval_mode(model):
            done = generate(
                model, prompts, [adapter_in_use(model)] * len(prompts), max_new_tokens=16,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, sampling=Sampling(temperature=1.0), seeds=seeds,
            )  # fmt: skip
        return sum(len(c.tokens) + (c.stop_token is not None) for c in done)

    def in_step() -> int:
        return sum(map(len, objective.rollout(model, 0, rows, nullcontext).completion_ids))

    times: dict[str, list[float]] = {"engine": [], "grpo": []}
    tokens = {}
    engine()  # warm-up
    for _ in range(repeats):
        for name, run in (("engine", engine), ("grpo", in_step)):
            start = time.perf_counter()
            tokens[name] = run()
            times[name].append(time.perf_counter() - start)
    assert tokens["engine"] == tokens["grpo"], tokens  # the same seeds drew the same samples
    rate = {k: tokens[k] / statistics.median(v) for k, v in times.items()}
    return {"tokens": tokens["engine"], "tokens_per_s": rate, "ratio": rate["grpo"] / rate["engine"],
            "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()}}  # fmt: skip


def deltatune_steps(steps: int, folder: Path) -> dict:
    raw = bench_config(folder / "deltatune", steps)
    result = train(validate_config(raw))
    records = [json.loads(line) for line in (folder / "deltatune" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records if r["split"] == "train"]
    return {"seconds_per_step": result.seconds_per_step, "mean_seconds_per_step": result.mean_seconds_per_step,
            "rewards": rewards}  # fmt: skip


def trl_steps(cfg, steps: int, folder: Path) -> dict:
    import trl
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, TrainerCallback

    tokenizer = load_tokenizer(cfg.model)
    splits = load_data(cfg.data, tokenizer, cfg.training.seed)
    rows = [
        {"prompt": tokenizer.decode(e.prompt_ids), "reference": e.reference}
        for e in splits.train[: 4 * steps]
    ]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(smollm2_path()), ADAPTER, is_trainable=True
    )

    def json_match_reward(prompts, completions, reference, **kwargs):
        return json_match(prompts, completions, reference)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    clock = Clock()
    args = trl.GRPOConfig(
        output_dir=str(folder / "trl"), report_to=[], use_cpu=True, save_strategy="no", bf16=False,
        gradient_checkpointing=False, per_device_train_batch_size=32, num_generations=8, max_completion_length=16,
        temperature=1.0, beta=0.0, loss_type="dapo", learning_rate=1e-4, lr_scheduler_type="cosine",
        warmup_steps=3, max_steps=steps, logging_steps=1, seed=0, disable_tqdm=True,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.GRPOTrainer(
            model=model, reward_funcs=[json_match_reward], args=args, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer, callbacks=[clock],
        )  # fmt: skip
        trainer.train()
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    return {
        "seconds_per_step": statistics.median(clock.seconds[1:]),
        "rewards": rewards,
        "step_seconds": clock.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = validate_config(bench_config(Path(tmp) / "probe", args.steps))
        result = {"sampling": sampling(cfg, args.repeats)}
        result["deltatune"] = deltatune_steps(args.steps, Path(tmp))
        result["trl"] = trl_steps(cfg, args.steps, Path(tmp))
    ours, theirs = result["deltatune"], result["trl"]
    result["step_time_ratio"] = ours["seconds_per_step"] / theirs["seconds_per_step"]
    for side in (ours, theirs):
        r = side["rewards"]
        side["mean_reward"] = statistics.mean(r)
        side["reward_stderr"] = statistics.stdev(r) / len(r) ** 0.5
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
