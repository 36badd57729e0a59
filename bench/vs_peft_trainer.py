"""Training throughput on the quickstart's real data: deltatune's trainer against Hugging Face PEFT + the
transformers Trainer running the same config, side by side in one process.

Same model (the bundled SmolLM2-135M-Instruct), the same LoRA (examples/quickstart.yaml: all-linear r=16,
alpha 32, no dropout), the same initial adapter weights (deltatune's, loaded into PEFT through its own
`PeftModel.from_pretrained`), the same batches in the same order (the deltatune trainer's length-grouped
batches of 8, fed to the HF Trainer through a sequential sampler), AdamW with the same learning rate, cosine
schedule, warmup and clipping. So the loss curves must agree, and the bench checks they do.

Variants:
- `deltatune`: `deltatune.train`'s own training step (`Trainer._train_step`) with the quickstart's settings:
  the shared prompt prefix run once per batch, the output head on labelled positions only.
- `hf-padded`: PEFT + `transformers.Trainer`, `DataCollatorForSeq2Seq` (each batch padded to its longest row).
- `hf-padding-free`: PEFT + `transformers.Trainer`, `DataCollatorWithFlattening` (transformers' own
  padding-free batches: the rows concatenated into one, attention kept within each row through position ids).

Each round runs every variant for `--steps` steps from the same initial adapter, rotating which goes first;
the first step of each run is a warm-up and not timed. Reported: median seconds per step, tokens per second
(all tokens of the rows, padding not counted, and tokens that carry loss), each variant's speed against the
fastest HF variant, and the largest per-step loss difference against deltatune.

    python bench/vs_peft_trainer.py --steps 20 --rounds 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch.utils.data import SequentialSampler
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from deltatune.core.io import save_adapter
from deltatune.data import load_data
from deltatune.data.formats import IGNORE
from deltatune.task.batching import micro_batch_indices
from deltatune.task.loading import load_model, load_tokenizer
from deltatune.train import load_train_config, seed_everything
from deltatune.train.distributed import Dist
from deltatune.train.loop import Trainer as DeltatuneTrainer
from deltatune.train.setup import prepare_trainable

CONFIG = Path(__file__).parents[1] / "examples" / "quickstart.yaml"


class _StepClock(TrainerCallback):
    """Wall time of each optimizer step of the HF Trainer, data loading included (as in deltatune's)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._tick = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._tick = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._tick)


class _InOrderTrainer(Trainer):
    """The HF Trainer fed the rows in the given order (deltatune's batches), keeping each step's exact loss
    (its logs round to 4 digits)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_losses: list[float] = []

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.step_losses.append(float(loss))
        return loss


def run_deltatune(cfg, base, tokenizer, splits, steps: int) -> tuple[list[float], list[float]]:
    model = copy.deepcopy(base)
    seed_everything(cfg.training.seed)  # the same draw as the initial adapter PEFT loads
    adapter_config = prepare_trainable(model, cfg.adapter, cfg.model.task)
    trainer = DeltatuneTrainer(cfg, model, tokenizer, splits, Dist(), torch.device("cpu"), adapter_config)
    seconds, losses = [], []
    for step in range(steps):
        tick = time.perf_counter()
        loss, _ = trainer._train_step(trainer.model, step)
        seconds.append(time.perf_counter() - tick)
        losses.append(loss)
    return seconds, losses


def run_hf(cfg, base, tokenizer, rows: list[dict], init: Path, steps: int, padding_free: bool, out: Path):
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(init), is_trainable=True)
    o, t = cfg.optim, cfg.training
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=t.batch_size, max_steps=steps, learning_rate=o.lr,
        lr_scheduler_type=o.scheduler, warmup_steps=o.warmup_steps, weight_decay=o.weight_decay,
        adam_beta1=o.betas[0], adam_beta2=o.betas[1], max_grad_norm=o.max_grad_norm, optim="adamw_torch",
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, remove_unused_columns=False, seed=t.seed,
    )  # fmt: skip
    collator = (
        DataCollatorWithFlattening(return_position_ids=True)
        if padding_free
        else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    )
    clock = _StepClock()
    trainer = _InOrderTrainer(
        model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[clock]
    )
    trainer.train()
    return clock.seconds, trainer.step_losses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--variants", nargs="+", default=["deltatune", "hf-padded", "hf-padding-free"],
        choices=["deltatune", "hf-padded", "hf-padding-free"],
    )  # fmt: skip
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dt-vs-peft-"))
    cfg = load_train_config(
        CONFIG,
        [
            f"training.max_steps={args.steps}",
            f"output_dir={scratch / 'deltatune'}",
            "training.progress=false",
        ],
    )
    t = cfg.training
    seed_everything(t.seed)
    tokenizer = load_tokenizer(cfg.model)
    splits = load_data(cfg.data, tokenizer, t.seed)
    base = load_model(cfg.model, tokenizer)

    # the initial adapter, as `deltatune train` would draw it, shared by every variant
    seed_everything(t.seed)
    first = copy.deepcopy(base)
    prepare_trainable(first, cfg.adapter, cfg.model.task)
    init = save_adapter(first, scratch / "initial", tokenizer=tokenizer)
    del first

    lengths = tuple(len(e.input_ids) for e in splits.train)
    batches = [
        micro_batch_indices(
            len(splits.train), t.seed, step, 0, t.batch_size, 1, 0, 1, lengths, t.length_grouping_steps
        )  # fmt: skip
        for step in range(args.steps)
    ]
    ordered = [splits.train[i] for idx in batches for i in idx]
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in ordered]
    tokens = sum(len(e.input_ids) for e in ordered[t.batch_size :]) / (args.steps - 1)  # per timed step
    labelled = sum(sum(y != IGNORE for y in e.labels[1:]) for e in ordered[t.batch_size :]) / (args.steps - 1)

    seconds: dict[str, list[float]] = {v: [] for v in args.variants}
    losses: dict[str, list[float]] = {}
    for r in range(args.rounds):
        order = args.variants[r % len(args.variants) :] + args.variants[: r % len(args.variants)]
        for variant in order:
            if variant == "deltatune":
                cfg_r = cfg.model_copy(update={"output_dir": str(scratch / f"deltatune-{r}")})
                s, loss = run_deltatune(cfg_r, base, tokenizer, splits, args.steps)
            else:
                s, loss = run_hf(cfg, base, tokenizer, rows, init, args.steps, variant == "hf-padding-free",
                                 scratch / f"{variant}-{r}")  # fmt: skip
            seconds[variant] += s[1:]
            losses.setdefault(variant, loss)
            print(f"round {r + 1} {variant}: median {statistics.median(s[1:]):.3f} s/step", flush=True)

    median = {v: statistics.median(s) for v, s in seconds.items()}
    hf = [v for v in args.variants if v.startswith("hf")]
    fastest_hf = min(hf, key=median.__getitem__) if hf else None
    print(f"\n## SmolLM2-135M, quickstart data, batch {t.batch_size}, {args.steps} steps x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads; per step {tokens:.0f} tokens, {labelled:.0f} with loss")  # fmt: skip
    print(
        "| variant | median s/step | tokens/s (all) | tokens/s (with loss) | x fastest HF | max loss diff vs deltatune |"
    )
    print("|---|---|---|---|---|---|")
    for v in args.variants:
        speed = median[fastest_hf] / median[v] if fastest_hf else float("nan")
        drift = (
            max(abs(a - b) for a, b in zip(losses[v], losses["deltatune"], strict=True))
            if "deltatune" in losses
            else float("nan")
        )
        print(f"| {v} | {median[v]:.3f} | {tokens / median[v]:.0f} | {labelled / median[v]:.0f} | {speed:.2f}x "
              f"| {drift:.1e} |")  # fmt: skip
    for v in args.variants:
        print(f"{v} losses: " + " ".join(f"{x:.4f}" for x in losses[v]))


if __name__ == "__main__":
    main()
