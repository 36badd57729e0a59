"""Prefix caching, side by side in one process on the bundled SmolLM2-135M-Instruct (real weights, fp32).

`ttft`: the server's engine with its prefix cache against one without. A request whose chat prompt opens
with a system prompt an earlier request already sent (its KV stored) against the same request on an engine
that runs every prompt whole; time to first token (one new token), median of interleaved repetitions (each
with a ticket number of its own, so only the system prompt is shared), for user messages of several lengths.
The answers' first tokens must agree.

`evaluation`: the quickstart's evaluation (examples/quickstart.yaml: 308 held-out tweets, batches of 50,
10 new tokens, greedy, `task.metrics.generate_answers`) with the rows' shared instruction run once per batch
against every row run whole; the answers must be identical.

`copies`: GRPO's sampling, `examples/grpo.yaml`'s shape: 4 prompts x G=8 seeded samples at temperature 1, at most
16 new tokens, under an adapter, through `runtime.generate` with the copies' shared prompt run once against
every row run whole; the samples must be identical.

    python bench/prefix_cache.py ttft [--reps 7]
    python bench/prefix_cache.py copies [--adapter outputs/quickstart/adapter] [--reps 5]
    python bench/prefix_cache.py evaluation [--adapter outputs/quickstart/adapter] [--reps 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from deltatune.models import smollm2_path

SYSTEM = (
    "You are a support assistant for a phone shop. Answer in one short sentence, politely, and never invent "
    "prices or stock levels."
)  # 40 tokens with SmolLM2's chat template around it
QUESTIONS = {
    "short": "Is the blue case in stock?",
    "medium": "My phone's battery drains overnight even when I close every app, and it got worse after the "
    "last update. Should I bring it in?",
    "long": " ".join(
        ["I bought a phone from you last month and the screen flickers when the brightness is low."] * 8
    ),
}


def _ttft(reps: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.runtime import AdapterCache
    from deltatune.serve.engine import Engine
    from deltatune.serve.work import Row

    torch.set_grad_enabled(False)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def chat(question: str) -> list[int]:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]

    warm_up = chat("Hello")
    shared = next(i for i, (a, b) in enumerate(zip(warm_up, chat("Bye"), strict=False)) if a != b)
    engines = {}
    with tempfile.TemporaryDirectory() as empty:
        for name, budget in (("cached", 256 << 20), ("whole", 0)):
            engines[name] = Engine(model, tokenizer, AdapterCache(model, Path(empty)), batch_window_s=0,
                                   prefix_cache_bytes=budget)  # fmt: skip
            engines[name].submit(Row(warm_up, None, 1)).result()  # stores the system prompt
        results = {"shared_prefix_tokens": shared}
        try:
            for kind, question in QUESTIONS.items():
                times: dict[str, list[float]] = {"cached": [], "whole": []}
                first: dict[str, int] = {}
                for rep in range(reps):
                    # a ticket number of its own: only the system prompt is stored, not this prompt
                    prompt = chat(f"Ticket {rep + 1}. {question}")
                    for name in ("cached", "whole") if rep % 2 else ("whole", "cached"):
                        started = time.perf_counter()
                        done = engines[name].submit(Row(prompt, None, 1)).result()
                        times[name].append(time.perf_counter() - started)
                        first[name] = done.tokens[0]
                assert first["cached"] == first["whole"], "the first tokens differ"
                medians = {name: statistics.median(t) for name, t in times.items()}
                results[kind] = {
                    "prompt_tokens": len(prompt),
                    "ttft_s": medians,
                    "cached_x_whole": medians["cached"] / medians["whole"],
                }
                print(json.dumps({kind: results[kind]}), flush=True)
        finally:
            for engine in engines.values():
                engine.close()
    return results


def _evaluation(adapter: str | None, reps: int) -> dict:
    from deltatune.runtime import generate
    from deltatune.task import metrics as evaluation
    from deltatune.train import evaluate_adapter, load_train_config

    cfg = load_train_config(Path(__file__).parents[1] / "examples" / "quickstart.yaml", [])
    ways = {"shared": generate, "whole": functools.partial(generate, share_prefixes=False)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    answers: dict[str, list[str]] = {}
    original = evaluation.generate_answers

    def timed(name):
        def run(*args, **kwargs):
            started = time.perf_counter()
            out = original(*args, **kwargs)
            times[name].append(time.perf_counter() - started)
            answers[name] = out
            return out

        return run

    metrics = {}
    for rep in range(reps):
        for name in ways if rep % 2 == 0 else reversed(list(ways)):
            evaluation.generate, evaluation.generate_answers = ways[name], timed(name)
            metrics[name] = evaluate_adapter(cfg, adapter, loss=False)
    evaluation.generate, evaluation.generate_answers = generate, original
    assert answers["shared"] == answers["whole"], "the answers differ"
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "adapter": adapter,
        "generating_s": medians,
        "whole_over_shared": medians["whole"] / medians["shared"],
        "json_valid": metrics["shared"]["json_valid"],
        "json_match": metrics["shared"]["json_match"],
        "answers": len(answers["shared"]),
    }
    print(json.dumps(result), flush=True)
    return result


def _copies(adapter: str | None, reps: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.core.io import load_adapter
    from deltatune.runtime import generate
    from deltatune.runtime.sampling import Sampling

    torch.set_grad_enabled(False)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    name = None
    if adapter is not None:
        name = "policy"
        load_adapter(model, adapter, adapter_name=name)
    instruction = (
        "Classify the sentiment of this tweet as negative, neutral or positive. Reply with JSON only, like "
        '{"sentiment": "neutral"}.\n\n'
    )
    tweets = ["my flight got cancelled again, third time this month", "lovely sunny morning at the lake with the dog",
              "the new update moved every button I use", "watching the game tonight with friends"]  # fmt: skip
    prompts = [
        tokenizer.apply_chat_template(
            [
                {"role": "system", "content": "You label tweets."},
                {"role": "user", "content": instruction + t},
            ],
            add_generation_prompt=True,
            return_dict=True,
        )["input_ids"]
        for t in tweets
    ]
    rows = [p for p in prompts for _ in range(8)]
    seeds = list(range(len(rows)))
    ways = {"shared": True, "whole": False}
    times: dict[str, list[float]] = {w: [] for w in ways}
    samples = {}
    for rep in range(reps):
        for way in ways if rep % 2 == 0 else reversed(list(ways)):
            started = time.perf_counter()
            done = generate(model, rows, [name] * len(rows), max_new_tokens=16, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, sampling=Sampling(temperature=1.0), seeds=seeds,
                            share_prefixes=ways[way])  # fmt: skip
            times[way].append(time.perf_counter() - started)
            samples[way] = [c.tokens for c in done]
    assert samples["shared"] == samples["whole"], "the samples differ"
    medians = {w: statistics.median(t) for w, t in times.items()}
    result = {
        "rows": len(rows),
        "prompt_tokens": sum(map(len, rows)),
        "new_tokens": sum(map(len, samples["shared"])),
        "sampling_s": medians,
        "whole_over_shared": medians["whole"] / medians["shared"],
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["ttft", "evaluation", "copies"])
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--adapter", default=None, help="an adapter folder (default: the base)")
    args = parser.parse_args()
    if args.what == "ttft":
        _ttft(args.reps or 7)
    elif args.what == "copies":
        _copies(args.adapter, args.reps or 5)
    else:
        _evaluation(args.adapter, args.reps or 2)


if __name__ == "__main__":
    sys.exit(main())
