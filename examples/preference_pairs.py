"""Preference pairs from the bundled tweets, for examples/preference.yaml (examples/README §11).

The quickstart's SFT adapter answers every tweet of the quickstart's training and held-out splits (greedy, as
its evaluation does). Each tweet becomes a pair: chosen, the correct JSON; rejected, the adapter's own answer
where it was wrong, else the JSON of one of the two wrong labels, drawn at random (seeded), so that no class
is pushed down more than another. (The first version always took the next class round the list; DPO then
lost accuracy, examples/README §11.) The held-out split is the
quickstart's 308 tweets, so accuracy before and after is measured on the same rows as §1.

    python examples/preference_pairs.py [ADAPTER] [--train N]   # default: outputs/quickstart/adapter, 1200

Writes outputs/preference/{train,validation}.jsonl (columns text, chosen, rejected, and the adapter's answer)
and prints how many pairs carry the adapter's own mistake. The answers are kept in outputs/preference/answers/
and reused by a later run for the same adapter file (they take ~3 minutes to generate).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from deltatune.core.atomic import write_text_atomic
from deltatune.core.hashing import sha256_file
from deltatune.core.io import load_adapter
from deltatune.data.dataset import split_rows
from deltatune.data.formats import Encoder
from deltatune.train import load_train_config
from deltatune.train.evaluate import generate_answers
from deltatune.train.setup import load_model, load_tokenizer

QUICKSTART = Path(__file__).with_name("quickstart.yaml")
LABELS = ["negative", "neutral", "positive"]
OUT = Path("outputs/preference")


def pair(row: dict, answer: str, rng: random.Random) -> tuple[dict, bool]:
    """The pair for one tweet and whether its rejected answer is the adapter's own mistake."""
    label = str(row["sentiment"]).strip()
    chosen = json.dumps({"sentiment": label})
    try:
        own_mistake = json.loads(answer) != {"sentiment": label}
    except json.JSONDecodeError:
        own_mistake = bool(answer.strip())
    wrong = rng.choice([name for name in LABELS if name != label])
    rejected = answer if own_mistake else json.dumps({"sentiment": wrong})
    return {"text": row["text"], "chosen": chosen, "rejected": rejected}, own_mistake


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", nargs="?", default="outputs/quickstart/adapter")
    parser.add_argument("--train", type=int, default=1200, help="training tweets to make pairs of")
    args = parser.parse_args()
    if not Path(args.adapter, "adapter_config.json").is_file():
        sys.exit(f"{args.adapter} holds no adapter: run `make demo` (or deltatune train {QUICKSTART}) first")
    cfg = load_train_config(QUICKSTART)
    tokenizer = load_tokenizer(cfg.model)
    train_rows, validation_rows, _ = split_rows(cfg.data, tokenizer, cfg.training.seed)
    train_rows = train_rows[: args.train]
    model = load_model(cfg.model, tokenizer)
    load_adapter(model, args.adapter, tokenizer=tokenizer)
    model.eval()
    encoder = Encoder(tokenizer, cfg.data)
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    weights = Path(args.adapter, "adapter_model.safetensors")
    for name, rows in (("train", train_rows), ("validation", validation_rows)):
        tick = time.perf_counter()
        cache = OUT / "answers" / f"{name}-{sha256_file(weights)[:16]}-{len(rows)}.json"
        if cache.is_file():
            answers = json.loads(cache.read_text())
        else:
            with torch.no_grad():
                answers = generate_answers(
                    model, tokenizer, [encoder.prompt_ids(r) for r in rows],
                    max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                )  # fmt: skip
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cache, json.dumps(answers))
        made = [pair(r, a, rng) for r, a in zip(rows, answers, strict=True)]
        text = "".join(json.dumps(p | {"answer": a}) + "\n" for (p, _), a in zip(made, answers, strict=True))
        write_text_atomic(OUT / f"{name}.jsonl", text)
        own = sum(mistake for _, mistake in made)
        print(f"{name}: {len(made)} pairs, {own} with the adapter's own wrong answer as rejected "
              f"({own / len(made):.1%}); {time.perf_counter() - tick:.0f}s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
