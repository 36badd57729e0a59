"""How long a short request waits behind one request of many long prompts, with the prompt-token budget per
round (chunked prefill, short work first) against without it (every waiting prompt prefilled in one go, as the
engine did before), side by side in one process on the SmolLM2-135M shape (random weights: the time does not
depend on them).

    python bench/prompt_fairness.py [--rows 8] [--length 1024] [--budget 512]

Per mode: the short request's latency alone, its latency when it arrives just after `rows` prompts of `length`
tokens with one new token each (the issue's 16 x 2,048 case, scaled to the machine), the ratio of the two, and
how long the long rows took (the cost of chunking them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import base_model  # noqa: E402

from deltatune.runtime import AdapterCache  # noqa: E402
from deltatune.serve.engine import Engine  # noqa: E402
from deltatune.serve.work import Row  # noqa: E402


class _Tokenizer:
    """What the engine reads of a tokenizer when no request has stop strings."""

    pad_token_id, eos_token_id = 0, None

    def __len__(self) -> int:
        return 49152


def _latency(engine: Engine, prompt: list[int], new_tokens: int = 4) -> float:
    started = time.perf_counter()
    engine.submit(Row(prompt, None, new_tokens)).result()
    return time.perf_counter() - started


def run(model, budget: int, rows: int, length: int, tmp: Path) -> dict[str, float]:
    engine = Engine(model, _Tokenizer(), AdapterCache(model, tmp), max_batch=rows + 1, batch_window_s=0,
                    prompt_tokens_per_round=budget)  # fmt: skip
    try:
        short = torch.randint(3, 49000, (4,), generator=torch.Generator().manual_seed(1)).tolist()
        _latency(engine, short)  # warm up
        alone = min(_latency(engine, short) for _ in range(3))
        g = torch.Generator().manual_seed(2)
        long_rows = [
            Row(torch.randint(3, 49000, (length,), generator=g).tolist(), None, 1) for _ in range(rows)
        ]
        started = time.perf_counter()
        futures = [engine.submit(r) for r in long_rows]
        behind = _latency(engine, short)
        for f in futures:
            f.result()
        return {"alone_s": alone, "behind_s": behind, "ratio": behind / alone,
                "long_rows_s": time.perf_counter() - started}  # fmt: skip
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=512)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = base_model().eval()
    print(f"{args.rows} prompts x {args.length} tokens (1 new token each), then a 4-token prompt (4 new tokens); "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    with tempfile.TemporaryDirectory() as adapters:  # the engine's adapter folder: none are used
        results = {
            f"budget {args.budget} per round": run(
                model, args.budget, args.rows, args.length, Path(adapters)
            ),
            "no budget (before)": run(model, 10**9, args.rows, args.length, Path(adapters)),
        }
    print("| mode | short alone s | short behind the long ones s | x alone | long rows done s |")
    print("|---|---|---|---|---|")
    for mode, r in results.items():
        print(
            f"| {mode} | {r['alone_s']:.2f} | {r['behind_s']:.2f} | {r['ratio']:.1f} | {r['long_rows_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
