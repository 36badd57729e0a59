"""What OpenAI's extra sampling settings cost on the decode engine, side by side in one process: the same
16 rows (SmolLM2 shape, random init, LoRA all-linear r=16) generated plain (temperature 1, top-p 0.9),
seeded, with presence and frequency penalties, and with log-probabilities (5 alternatives), and all three.
Each ratio is against the plain run, interleaved rep by rep so drift on a shared machine hits every
variant alike.

    python bench/sampling_cost.py --rows 16 --new-tokens 32 --reps 5
"""

from __future__ import annotations

import argparse
import json

from common import generation_setup, interleaved, median

from deltatune.runtime import generate
from deltatune.runtime.sampling import Sampling

VARIANTS = {
    "plain": {},
    "seed": {"seed": 1},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5},
    "logprobs-5": {"logprobs": 5},
    "all": {"seed": 1, "presence_penalty": 0.5, "frequency_penalty": 0.5, "logprobs": 5},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model, prompts, _ = generation_setup(args.rows)
    model.to(args.device)

    def run(settings: dict) -> None:
        done = generate(
            model, prompts, ["default"] * args.rows, max_new_tokens=args.new_tokens, pad_token_id=0,
            eos_token_id=None, sampling=Sampling(temperature=1.0, top_p=0.9, **settings),
        )  # fmt: skip
        assert all(len(c.tokens) == args.new_tokens for c in done)

    times = interleaved({name: (lambda s=settings: run(s)) for name, settings in VARIANTS.items()}, args.reps)
    med = {name: median(t) for name, t in times.items()}
    print(json.dumps({
        "device": args.device, "rows": args.rows, "new_tokens": args.new_tokens, "median_s": med,
        "x_plain": {name: med[name] / med["plain"] for name in VARIANTS},
        "spread_s": {name: [min(t), max(t)] for name, t in times.items()},
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
