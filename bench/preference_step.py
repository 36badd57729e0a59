"""deltatune's DPO step against TRL's DPOTrainer with PEFT, side by side in one process, on the quickstart's
real model and data: SmolLM2-135M-Instruct, LoRA all-linear r=16 (alpha 32, no dropout), pairs of tweets whose
chosen answer is the correct JSON and whose rejected answer names another class, 8 pairs a step, beta 0.1.

Same initial adapter (TRL builds the PEFT model from the config; deltatune loads that adapter), the same
pairs in the same order, the same AdamW (lr 5e-4, torch's plain implementation for both). TRL's step is its
`training_step` (its collator's batch, its fused head, the reference with adapters off); deltatune's is
`PreferenceObjective.loss` (each prompt run once per pair, for the policy and the reference) and backward.
Also an SFT step (next-token loss on prompt + chosen, deltatune's trainer path) on the same pairs, for the ratio
the arithmetic bounds.

Reported: median seconds per step (the first step of each is a warm-up), the loss at step 1 and the largest
per-step loss difference over the run; and peak memory, which one process cannot split between two trainers
(the heap one step freed serves the next one), so each side then runs alone in a subprocess (`--only`), with
both models loaded as in the shared run, and reports how far its steps raised the peak resident set.

    python bench/preference_step.py [--steps 10] [--pairs 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from deltatune.core.allocator import release_freed_memory
from deltatune.core.io import load_adapter
from deltatune.data.dataset import split_rows
from deltatune.data.formats import Encoder, RowError
from deltatune.models import smollm2_path
from deltatune.task.batching import collate
from deltatune.task.loading import load_tokenizer
from deltatune.task.loss import task_loss
from deltatune.train import load_train_config
from deltatune.train.preference import PreferenceObjective

QUICKSTART = Path(__file__).parents[1] / "examples" / "quickstart.yaml"
LABELS = ["negative", "neutral", "positive"]
SIDES = ("trl", "deltatune", "sft")


class PeakRss:
    """The largest resident set size while the block runs, sampled every 2 ms, and how far it rose (MiB) above
    the size when the block began."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.added = (self.peak - self.start) / 2**20

    def _watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    @staticmethod
    def _rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def pairs(n: int):
    cfg = load_train_config(QUICKSTART)
    spec = cfg.data.model_copy(update={"format": "preference", "output_template": None})
    tokenizer = load_tokenizer(cfg.model)
    rows, _, _ = split_rows(cfg.data, tokenizer, 0)
    encoder = Encoder(tokenizer, spec)
    examples = []
    for row in rows:
        label = str(row["sentiment"]).strip()
        wrong = LABELS[(LABELS.index(label) + 1) % 3]
        fields = dict(row, chosen=json.dumps({"sentiment": label}), rejected=json.dumps({"sentiment": wrong}))
        try:
            examples.append(encoder.encode(fields))
        except RowError:  # a tweet too long for max_length: skipped, as training skips it
            continue
        if len(examples) == n:
            break
    return examples, tokenizer


def trl_trainer(tokenizer, folder: Path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_path())
    lora = LoraConfig(
        r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    args = DPOConfig(output_dir=str(folder / "trl"), beta=0.1, report_to=[], use_cpu=True, save_strategy="no",
                     per_device_train_batch_size=8, gradient_checkpointing=False)  # fmt: skip
    data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=base, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora
        )
    trainer.model.save_pretrained(folder / "start")
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--only", choices=SIDES, help="one side alone, for its peak memory")
    args = parser.parse_args()
    torch.manual_seed(0)
    examples, tokenizer = pairs(args.steps * args.pairs)
    batches = [list(range(s * args.pairs, (s + 1) * args.pairs)) for s in range(args.steps)]
    folder = Path(tempfile.mkdtemp())
    trainer = trl_trainer(tokenizer, folder)
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(smollm2_path())
    load_adapter(ours, folder / "start", is_trainable=True)
    ours.train()
    objective = PreferenceObjective(
        "dpo", {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0}, pad_id=tokenizer.pad_token_id,
        batch_size=args.pairs, prompt_once=True, precompute=False, train=examples, validation=[],
    )  # fmt: skip
    theirs = trainer.model
    theirs.train()
    sides = Sides(trainer, theirs, ours, objective, tokenizer, examples)
    if args.only:
        release_freed_memory()  # what loading freed goes back to the OS, so the steps' growth shows
        with PeakRss() as watch:
            for indices in batches:
                sides.step(args.only, indices)
        print(json.dumps({"peak_added_mib": watch.added, "peak_mib": watch.peak / 2**20}))
        return
    results = {name: {"seconds": [], "loss": []} for name in SIDES}
    for step, indices in enumerate(batches):
        for name in SIDES if step % 2 == 0 else SIDES[::-1]:
            tick = time.perf_counter()
            results[name]["loss"].append(sides.step(name, indices))
            results[name]["seconds"].append(time.perf_counter() - tick)
    prompt = statistics.mean(len(e.prompt_ids) for e in examples)
    answer = statistics.mean(len(e.input_ids) - len(e.prompt_ids) for e in examples)
    report(results, prompt, answer)
    memory(args)


def memory(args: argparse.Namespace) -> None:
    alone = {}
    for name in SIDES:
        command = [
            sys.executable,
            __file__,
            "--steps",
            str(args.steps),
            "--pairs",
            str(args.pairs),
            "--only",
            name,
        ]
        run = subprocess.run(command, capture_output=True, text=True, check=True)
        alone[name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{name} alone: its steps raised the peak RSS by {alone[name]['peak_added_mib']:.0f} MiB "
              f"(peak {alone[name]['peak_mib']:.0f} MiB)")  # fmt: skip
    ratio = alone["deltatune"]["peak_added_mib"] / max(alone["trl"]["peak_added_mib"], 1)
    print(f"deltatune / TRL peak memory of the steps: {ratio:.2f}x")


class Sides:
    """One optimizer step of each side: TRL's DPO, deltatune's DPO, deltatune's SFT on prompt + chosen."""

    def __init__(self, trainer, theirs, ours, objective, tokenizer, examples) -> None:
        self.trainer, self.theirs, self.ours = trainer, theirs, ours
        self.objective, self.tokenizer, self.examples = objective, tokenizer, examples
        trainable = [p for p in theirs.parameters() if p.requires_grad]
        mine = [p for p in ours.parameters() if p.requires_grad]
        self.optimizers = {
            "trl": torch.optim.AdamW(trainable, lr=5e-4, foreach=False),
            "deltatune": torch.optim.AdamW(mine, lr=5e-4, foreach=False),
        }

    def step(self, name: str, indices: list[int]) -> float:
        loss = _step(name, indices, self.examples, self.trainer, self.theirs, self.ours, self.objective,
                     self.tokenizer)  # fmt: skip
        if name in self.optimizers:
            self.optimizers[name].step()
        (self.theirs if name == "trl" else self.ours).zero_grad(set_to_none=True)
        return loss


def _step(name, indices, examples, trainer, theirs, ours, objective, tokenizer) -> float:
    if name == "trl":
        rows = [examples[i] for i in indices]
        inputs = trainer.data_collator([
            {"prompt_ids": e.prompt_ids, "chosen_ids": e.input_ids[len(e.prompt_ids) :], "rejected_ids": e.rejected_ids}
            for e in rows
        ])  # fmt: skip
        loss = trainer.compute_loss(theirs, inputs)
        loss.backward()
        return float(loss)
    if name == "deltatune":
        out = objective.loss(ours, "train", indices, torch.device("cpu"))
        out.loss.backward()
        return float(out.loss)
    batch = collate([examples[i] for i in indices], tokenizer.pad_token_id, False)
    loss_sum, count, _ = task_loss(ours, batch, False)
    (loss_sum / count).backward()
    return float(loss_sum / count)


def report(results: dict, prompt: float, answer: float) -> None:
    def median(name, key):
        return statistics.median(results[name][key][1:])

    print(f"mean prompt {prompt:.1f} tokens, mean answer {answer:.1f} tokens")
    print(f"{'step':<12}{'s/step':>9}{'loss at step 1':>16}")
    for name in results:
        print(f"{name:<12}{median(name, 'seconds'):>9.3f}{results[name]['loss'][0]:>16.6f}")
    print(f"deltatune / TRL time: {median('deltatune', 'seconds') / median('trl', 'seconds'):.2f}x")
    gaps = [abs(a - b) for a, b in zip(results["deltatune"]["loss"], results["trl"]["loss"], strict=True)]
    print(
        f"loss at step 1: |deltatune - TRL| = {gaps[0]:.2e}; largest per-step gap over the run {max(gaps):.2e}"
    )
    print("losses deltatune: " + " ".join(f"{x:.4f}" for x in results["deltatune"]["loss"]))
    print("losses TRL:       " + " ".join(f"{x:.4f}" for x in results["trl"]["loss"]))
    bound = 3 * (prompt + 2 * answer) / (2 * (prompt + answer))
    print(f"DPO / SFT-on-chosen time: {median('deltatune', 'seconds') / median('sft', 'seconds'):.2f}x "
          f"(arithmetic floor for LoRA, prompt once: 3(P+2A) / 2(P+A) = {bound:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
