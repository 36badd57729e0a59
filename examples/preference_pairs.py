"""Preference pairs from the bundled tweets, for examples/preference.yaml (examples/README §11).

The quickstart's SFT adapter answers every tweet of the quickstart's training and held-out splits (greedy, as
its evaluation does). Each training tweet becomes two pairs, one per wrong label: chosen, the correct JSON; rejected, the JSON
of a wrong label, the adapter's own answer standing in for its label where it was wrong. The answer is a
choice among three classes, and a pair pushes down only its rejected one: with one pair per tweet the mass
pushed off one wrong class lands partly on the other, and accuracy fell (examples/README §11 has the runs).
A held-out tweet is one pair (the adapter's own wrong answer, else a wrong label drawn at random), so the
generation metrics score each of the quickstart's held-out tweets once. The held-out split is the
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
from deltatune.task.loading import load_model, load_tokenizer
from deltatune.task.metrics import generate_answers
from deltatune.train import load_train_config

QUICKSTART = Path(__file__).with_name("quickstart.yaml")
LABELS = ["negative", "neutral", "positive"]
OUT = Path("outputs/preference")


def pairs(row: dict, answer: str) -> tuple[list[dict], bool]:
    """The pairs for one tweet, and whether the adapter's answer to it was wrong."""
    label = str(row["sentiment"]).strip()
    chosen = json.dumps({"sentiment": label})
    try:
        parsed = json.loads(answer)
    except json.JSONDecodeError:
        parsed = None
    own_mistake = parsed != {"sentiment": label}
    made = []
    for wrong in (name for name in LABELS if name != label):
        rejected = answer if parsed == {"sentiment": wrong} else json.dumps({"sentiment": wrong})
        made.append({"text": row["text"], "chosen": chosen, "rejected": rejected, "answer": answer})
    if own_mistake and parsed not in [{"sentiment": w} for w in LABELS]:  # not JSON of a class: a third pair
        made.append({"text": row["text"], "chosen": chosen, "rejected": answer, "answer": answer})
    return made, own_mistake


def _held_out_pair(candidates: list[dict], rng: random.Random) -> dict:
    """The adapter's own wrong answer where there is one, else a wrong label drawn at random (seeded)."""
    own = [p for p in candidates if p["rejected"] == p["answer"]]
    return own[0] if own else rng.choice(candidates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", nargs="?", default="outputs/quickstart/adapter")
    parser.add_argument("--train", type=int, default=1200, help="training tweets to make pairs of")
    parser.add_argument("--out", type=Path, default=OUT, help="where the pair files go")
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
    args.out.mkdir(parents=True, exist_ok=True)
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
        made = [pairs(r, a) for r, a in zip(rows, answers, strict=True)]
        if (
            name == "validation"
        ):  # one pair per held-out tweet, so the generation metrics score each tweet once
            rng = random.Random(0)
            made = [([_held_out_pair(p, rng)], mistake) for p, mistake in made]
        text = "".join(json.dumps(p) + "\n" for rows_of_tweet, _ in made for p in rows_of_tweet)
        write_text_atomic(args.out / f"{name}.jsonl", text)
        own = sum(mistake for _, mistake in made)
        print(f"{name}: {sum(len(p) for p, _ in made)} pairs from {len(made)} tweets, {own} answered wrong by the "
              f"adapter ({own / len(made):.1%}); {time.perf_counter() - tick:.0f}s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
