"""The output head on a strided slice of the hidden states against the same rows contiguous (`core.head_input`).

`head`: SmolLM2's 49,152 x 576 output head alone (`F.linear`) on the last position of `rows` rows of 40
positions, as transformers' `logits_to_keep=1` hands it over (a strided view) and as a contiguous copy, fp32
and bf16, interleaved rounds.

`evaluation`: the quickstart's evaluation generations (examples/quickstart.yaml: the held-out tweets, batches of
50, 10 new greedy tokens, `task.metrics.generate_answers`, the adapter loaded) with the engine's prefill
handing the head a contiguous input against the head on the strided view, in the model dtypes asked; the
answers of the two ways must be identical. Also how the bf16 answers and metrics compare with fp32's.

    python bench/head_input.py head [--reps 5]
    python bench/head_input.py evaluation [--adapter outputs/quickstart/adapter] [--dtypes float32 bfloat16] [--reps 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved  # noqa: E402


def _head(reps: int) -> list[dict]:
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(49152, 576, dtype=dtype)
        for rows in (1, 4, 16, 50):
            hidden = torch.randn(rows, 40, 576, dtype=dtype)
            strided = hidden[:, -1:, :]
            times = interleaved(
                {
                    "strided": lambda s=strided, w=weight: F.linear(s, w),
                    "contiguous": lambda s=strided, w=weight: F.linear(
                        s.clone(memory_format=torch.contiguous_format), w
                    ),
                },
                reps,
                progress=False,
            )
            medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            results.append(
                {"dtype": str(dtype).removeprefix("torch."), "rows": rows}
                | {f"{name}_ms": round(ms, 1) for name, ms in medians.items()}
                | {"strided_over_contiguous": round(medians["strided"] / medians["contiguous"], 2)}
            )
            print(json.dumps(results[-1]), flush=True)
    return results


def _evaluation(adapter: str, dtypes: list[str], reps: int) -> dict:
    from deltatune.core.io import load_adapter
    from deltatune.runtime import prefill
    from deltatune.task.metrics import answer_metrics, generate_answers
    from deltatune.train import load_data, load_model, load_tokenizer, load_train_config, usable_row

    cfg = load_train_config(Path(__file__).parents[1] / "examples" / "quickstart.yaml", [])
    tokenizer = load_tokenizer(cfg.model)
    splits = load_data(cfg.data, tokenizer, cfg.training.seed, row_check=usable_row(cfg))
    sample = splits.validation[: cfg.eval.generate_samples]
    prompts, references = [e.prompt_ids for e in sample], [e.reference or "" for e in sample]
    fixed = prefill.contiguous_head_input
    ways = {"contiguous": fixed, "strided": lambda model: contextlib.nullcontext()}
    result: dict = {"adapter": adapter, "answers": len(prompts)}
    answers_of: dict[str, list[str]] = {}
    for dtype in dtypes:
        model = load_model(cfg.model.model_copy(update={"dtype": dtype}), tokenizer, None, cfg.quantization)
        load_adapter(model, adapter, tokenizer=tokenizer)
        model.eval()
        answers: dict[str, list[str]] = {}

        def run(way, model=model, answers=answers):
            prefill.contiguous_head_input = ways[way]
            try:
                answers[way] = generate_answers(
                    model, tokenizer, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                    batch_size=cfg.eval.batch_size,
                )  # fmt: skip
            finally:
                prefill.contiguous_head_input = fixed

        times = interleaved({way: lambda w=way: run(w) for way in ways}, reps, warmup=0)
        assert answers["contiguous"] == answers["strided"], f"{dtype}: the answers differ"
        answers_of[dtype] = answers["contiguous"]
        medians = {way: statistics.median(t) for way, t in times.items()}
        result[dtype] = {
            "generating_s": {way: round(s, 1) for way, s in medians.items()},
            "strided_over_contiguous": round(medians["strided"] / medians["contiguous"], 2),
            **answer_metrics(answers["contiguous"], references, ["json_valid", "json_match"]),
        }
        print(json.dumps({dtype: result[dtype]}), flush=True)
    if {"float32", "bfloat16"} <= answers_of.keys():
        same = sum(a == b for a, b in zip(answers_of["float32"], answers_of["bfloat16"], strict=True))
        result["bfloat16_answers_equal_float32"] = same
        result["bfloat16_speedup"] = round(
            result["float32"]["generating_s"]["contiguous"]
            / result["bfloat16"]["generating_s"]["contiguous"],
            2,
        )
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["head", "evaluation"])
    parser.add_argument("--adapter", default="outputs/quickstart/adapter")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.what == "head":
        _head(args.reps or 5)
    else:
        _evaluation(args.adapter, args.dtypes, args.reps or 2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
