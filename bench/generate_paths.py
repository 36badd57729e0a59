"""The two paths of `runtime.generate`, side by side in one process: the decode engine (the default for plain
LoRA rows and the base; what `deltatune generate`, training evaluation and the server run) against
transformers' `model.generate` (`continuous=False`, the reference). Same model, prompts and adapter;
greedy; the tokens must be identical, and the table gives the time ratio.

Two shapes of work: `uniform` (every row runs to the same token limit) and `ragged` (each row its own limit,
as answers of different lengths end at end-of-sequence in an evaluation; transformers' batch runs until its
longest row is done, the engine drops each row as it ends).

    python bench/generate_paths.py --rows 16 --new-tokens 32 --reps 5
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from common import generation_setup, interleaved, median

from deltatune.runtime import generate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32, help="the longest row's token limit")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    model, prompts, g = generation_setup(args.rows)
    ragged = torch.randint(4, args.new_tokens + 1, (args.rows,), generator=g).tolist()
    ragged[0] = args.new_tokens  # one row always runs to the end
    results = {}
    for shape, limits in (("uniform", [args.new_tokens] * args.rows), ("ragged", ragged)):

        def call(continuous: bool, limits=limits):
            return generate(
                model, prompts, ["default"] * args.rows, max_new_tokens=limits, pad_token_id=0,
                eos_token_id=None, continuous=continuous,
            )  # fmt: skip

        engine, reference = call(True), call(False)
        assert [c.tokens for c in engine] == [c.tokens for c in reference], "the two paths disagree"
        print(f"{shape}: {args.rows} rows, {sum(limits)} new tokens", file=sys.stderr)
        times = interleaved({"engine": lambda: call(True), "transformers": lambda: call(False)}, args.reps)
        med = {k: median(v) for k, v in times.items()}
        results[shape] = {
            "median_s": med,
            "spread_s": {k: [min(v), max(v)] for k, v in times.items()},
            "engine_x_transformers": med["engine"] / med["transformers"],
            "new_tokens": sum(limits),
        }
        print(json.dumps({shape: results[shape]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
