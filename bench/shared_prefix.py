"""training.shared_prefix on the quickstart's real data: the same LoRA trained twice side by side in one process,
once with each row's shared chat-template prefix run per row and once per batch. Each step feeds both copies the
trainer's own batch (length grouping as in examples/quickstart.yaml), alternating which goes first; reported:
median seconds per step, tokens per second (all tokens, and those that carry loss), and how far the two loss
curves drift apart.

    python bench/shared_prefix.py --steps 20
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from deltatune.data import load_data
from deltatune.task.batching import collate, micro_batch_indices
from deltatune.task.loading import load_model, load_tokenizer
from deltatune.task.loss import task_loss
from deltatune.train import load_train_config
from deltatune.train.loop import build_optimizer
from deltatune.train.setup import prepare_trainable

CONFIG = Path(__file__).parents[1] / "examples" / "quickstart.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cfg = load_train_config(CONFIG)
    t = cfg.training
    torch.manual_seed(t.seed)
    tokenizer = load_tokenizer(cfg.model)
    splits = load_data(cfg.data, tokenizer, t.seed)
    model = load_model(cfg.model, tokenizer)
    prepare_trainable(model, cfg.adapter, cfg.model.task)
    models = {False: model.train(), True: copy.deepcopy(model).train()}
    optimizers = {
        k: build_optimizer(cfg, [p for p in m.parameters() if p.requires_grad]) for k, m in models.items()
    }
    lengths = tuple(len(e.input_ids) for e in splits.train)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    losses: dict[bool, list[float]] = {False: [], True: []}
    tokens = labelled = 0
    for step in range(args.steps):
        idx = micro_batch_indices(len(splits.train), t.seed, step, 0, t.batch_size, 1, 0, 1, lengths,
                                  t.length_grouping_steps)  # fmt: skip
        batch = collate([splits.train[i] for i in idx], tokenizer.pad_token_id, False)
        tokens += int(batch["attention_mask"].sum())
        labelled += int((batch["labels"][:, 1:] != -100).sum())
        for shared in (step % 2 == 0, step % 2 == 1):
            tick = time.perf_counter()
            loss, count, _ = task_loss(models[shared], batch, False, share_prefix=shared)
            (loss / count).backward()
            optimizers[shared].step()
            optimizers[shared].zero_grad(set_to_none=True)
            seconds[shared].append(time.perf_counter() - tick)
            losses[shared].append(loss.item() / count)
    median = {k: statistics.median(v[1:]) for k, v in seconds.items()}  # the first step warms up
    total = {k: sum(v[1:]) for k, v in seconds.items()}
    steps = args.steps - 1
    share = tokens / args.steps
    print(f"## training.shared_prefix, quickstart data, batch {t.batch_size}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads; {share:.0f} tokens per step, {labelled / args.steps:.0f} with loss")  # fmt: skip
    print("| prefix | median s/step | tokens/s (all) | tokens/s (with loss) |\n|---|---|---|---|")
    for shared, name in ((False, "per row"), (True, "once per batch")):
        rate = steps / total[shared]
        print(f"| {name} | {median[shared]:.3f} | {rate * share:.0f} | {rate * labelled / args.steps:.0f} |")
    drift = max(abs(a - b) for a, b in zip(losses[False], losses[True], strict=True))
    print(f"\nspeed-up (median step): {median[False] / median[True]:.2f}x; largest loss difference over the run: "
          f"{drift:.2e} (losses {losses[False][0]:.4f} -> {losses[False][-1]:.4f})")  # fmt: skip


if __name__ == "__main__":
    main()
