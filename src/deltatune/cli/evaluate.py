"""The subcommands that judge an adapter before it ships: bench (latency), forgetting, compare (transfer)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .arguments import positive_int


def add_evaluation_parsers(sub: Any) -> None:
    _add_bench_parser(sub)
    _add_forgetting_parser(sub)
    _add_compare_parser(sub)


def _bench(args: argparse.Namespace) -> int:
    from ..evaluate.latency_report import measure_latency, table
    from ..evaluate.settings import LatencySettings

    try:
        settings = LatencySettings(
            batch_sizes=tuple(args.batch_sizes), prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
            reps=args.reps, variants=tuple(args.variants), quantize=args.quantize,
        )  # fmt: skip
    except ValueError as exc:
        print(f"deltatune bench: error: {exc}", file=sys.stderr)
        return 2
    report = measure_latency(args.base, args.adapter, settings, out=args.out, device=args.device)
    return _printed(table(report), args.out, "latency")


def _printed(table: str, out: Path | None, stem: str) -> int:
    print(table)
    if out is not None:
        print(f"report: {out}/{stem}.md, {stem}.json, {stem}.png")
    return 0


def _add_device_and_out(p: argparse.ArgumentParser, stem: str) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", type=Path, help=f"write {stem}.md / .json / .png into this folder (atomically)")


def _add_bench_parser(sub: Any) -> None:
    from ..evaluate.settings import QUANTIZED_BASES, VARIANTS

    p = sub.add_parser(
        "bench", help="latency of base / unmerged / merged / quantized-base on this machine, side by side"
    )
    p.add_argument("--base", required=True, help="model folder, hub id, or a bundled name (smollm2)")
    p.add_argument("--adapter", required=True, help="the adapter folder")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 4])
    p.add_argument("--prompt-tokens", type=positive_int, default=64)
    p.add_argument("--new-tokens", type=positive_int, default=16)
    p.add_argument("--reps", type=positive_int, default=5, help="interleaved rounds after a warm-up round")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument(
        "--quantize",
        choices=QUANTIZED_BASES,
        default="nf4",
        help="the quantized variant's base: nf4 (bitsandbytes 4-bit, the quant extra), or int8 / int4 packed "
        "for torch's CPU kernels in bfloat16, as `serve --quantize` runs it",
    )
    _add_device_and_out(p, "latency")
    p.set_defaults(func=_bench)


def _forgetting(args: argparse.Namespace) -> int:
    from ..evaluate.forgetting_report import measure_forgetting, table
    from ..evaluate.settings import ForgettingSettings

    settings = ForgettingSettings(
        texts=args.texts, max_tokens=args.max_tokens, prompts=args.prompts, new_tokens=args.new_tokens
    )
    report = measure_forgetting(
        args.base, args.adapter, model=args.model, corpus=args.corpus, prompts=args.prompt_file,
        settings=settings, out=args.out, device=args.device, progress=_progress("forgetting"),
    )  # fmt: skip
    return _printed(table(report), args.out, "forgetting")


def _progress(command: str) -> Callable[[str], None]:
    return lambda what: print(f"{command}: {what}", file=sys.stderr, flush=True)


def _add_forgetting_parser(sub: Any) -> None:
    from ..evaluate.settings import GENERAL_PROMPTS

    p = sub.add_parser(
        "forgetting",
        help="what an adapter changed on general text: KL to the base, perplexity, changed answers",
    )
    p.add_argument("--base", required=True, help="model folder, hub id, or a bundled name (smollm2)")
    subject = p.add_mutually_exclusive_group(required=True)
    subject.add_argument("--adapter", type=Path, help="the adapter folder")
    subject.add_argument("--model", type=Path, help="a fully fine-tuned model folder, compared with --base")
    p.add_argument("--corpus", default="bundled:news",
                   help=".txt (one text per line) or .jsonl/.csv with a text column; default: NYT editorial "
                   "sentences (bundled:news)")  # fmt: skip
    p.add_argument("--prompt-file", help="general prompts, one per line (default: 24 built-in prompts)")
    p.add_argument("--texts", type=positive_int, default=64, help="corpus texts scored")
    p.add_argument("--max-tokens", type=positive_int, default=128, help="tokens per text")
    p.add_argument("--prompts", type=int, default=len(GENERAL_PROMPTS), help="prompts answered (0: none)")
    p.add_argument("--new-tokens", type=positive_int, default=24, help="greedy tokens per prompt")
    _add_device_and_out(p, "forgetting")
    p.set_defaults(func=_forgetting)


def _compare(args: argparse.Namespace) -> int:
    from ..evaluate.compare_report import compare, table

    report = compare(
        args.task, args.adapter, models=args.model, with_base=not args.no_base, out=args.out, device=args.device,
        cache_mb=args.cache_mb, progress=_progress("compare"), overrides=args.overrides,
    )  # fmt: skip
    return _printed(table(report), args.out, "compare")


def _add_compare_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare", help="transfer matrix: the base, adapters and model folders on several evaluation tasks"
    )
    p.add_argument("--task", action="append", required=True,
                   help="[NAME=]CONFIG.yaml: a training config whose data and eval sections define the task")  # fmt: skip
    p.add_argument("--adapter", action="append", default=[], help="[NAME=]ADAPTER_FOLDER (repeat)")
    p.add_argument("--model", action="append", default=[],
                   help="[NAME=]MODEL_FOLDER: a merged export or a full fine-tune (repeat)")  # fmt: skip
    p.add_argument("--no-base", action="store_true", help="leave the base row out (no change column then)")
    p.add_argument("--cache-mb", type=float, help="memory for loaded adapters (default: all stay loaded)")
    p.add_argument(
        "overrides", nargs="*", help="section.key=value, applied to every task's config (as train)"
    )
    _add_device_and_out(p, "compare")
    p.set_defaults(func=_compare)
