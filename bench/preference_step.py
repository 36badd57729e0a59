"""deltatune's DPO step against TRL's DPOTrainer with PEFT, side by side in one process, on the quickstart's
real model and data: SmolLM2-135M-Instruct, LoRA all-linear r=16 (alpha 32, no dropout), pairs of tweets whose
chosen answer is the correct JSON and whose rejected answer names another class, 8 pairs a step, beta 0.1.

Same initial adapter (TRL builds the PEFT model from the config; deltatune loads that adapter), the same
pairs in the same order, the same AdamW (lr 5e-4, torch's plain implementation for both). TRL's step is its
`training_step` (its collator's batch, its fused head, the reference with adapters off); deltatune's is
`PreferenceObjective.loss` (each prompt run once per pair, for the policy and the reference) and backward.
Also an SFT step (next-token loss on prompt + chosen, deltatune's trainer path) on the same pairs, for the ratio
the arithmetic bounds.

Reported: median seconds per step (the first step of each is a warm-up), the peak resident memory each step
adds above what was resident before it (sampled every 2 ms), the loss at step 1 and the largest per-step loss
difference over the run.

    python bench/preference_step.py [--steps 10] [--pairs 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from deltatune.core.io import load_adapter
from deltatune.data.dataset import split_rows
from deltatune.data.formats import Encoder
from deltatune.models import smollm2_path
from deltatune.train import load_train_config
from deltatune.train.batching import collate
from deltatune.train.evaluate import task_loss
from deltatune.train.preference import PreferenceObjective
from deltatune.train.setup import load_tokenizer

QUICKSTART = Path(__file__).parents[1] / "examples" / "quickstart.yaml"
LABELS = ["negative", "neutral", "positive"]


class PeakRss:
    """The largest resident set size seen while the block runs, above the size when it began (MiB)."""

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
    for row in rows[:n]:
        label = str(row["sentiment"]).strip()
        wrong = LABELS[(LABELS.index(label) + 1) % 3]
        fields = dict(row, chosen=json.dumps({"sentiment": label}), rejected=json.dumps({"sentiment": wrong}))
        examples.append(encoder.encode(fields))
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
    optimizers = {
        "trl": torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=5e-4, foreach=False),
        "deltatune": torch.optim.AdamW(
            [p for p in ours.parameters() if p.requires_grad], lr=5e-4, foreach=False
        ),
        "sft": None,
    }
    results = {name: {"seconds": [], "added_mib": [], "loss": []} for name in optimizers}
    for step, indices in enumerate(batches):
        for name in ["trl", "deltatune", "sft"] if step % 2 == 0 else ["deltatune", "trl", "sft"]:
            tick = time.perf_counter()
            with PeakRss() as memory:
                loss = _step(name, indices, examples, trainer, theirs, ours, objective, tokenizer)
                if optimizers[name] is not None:
                    optimizers[name].step()
                    optimizers[name].zero_grad(set_to_none=True)
                else:
                    ours.zero_grad(set_to_none=True)
            results[name]["seconds"].append(time.perf_counter() - tick)
            results[name]["added_mib"].append(memory.added)
            results[name]["loss"].append(loss)
    prompt = statistics.mean(len(e.prompt_ids) for e in examples)
    answer = statistics.mean(len(e.input_ids) - len(e.prompt_ids) for e in examples)
    report(results, prompt, answer)


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
    print(f"{'step':<12}{'s/step':>9}{'peak MiB added':>16}{'loss at step 1':>16}")
    for name in results:
        print(f"{name:<12}{median(name, 'seconds'):>9.3f}{median(name, 'added_mib'):>16.0f}"
              f"{results[name]['loss'][0]:>16.6f}")  # fmt: skip
    print(f"deltatune / TRL time: {median('deltatune', 'seconds') / median('trl', 'seconds'):.2f}x, "
          f"peak memory added: {median('deltatune', 'added_mib') / median('trl', 'added_mib'):.2f}x")  # fmt: skip
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
