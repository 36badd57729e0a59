"""deltatune train | eval | generate | inspect."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..core.errors import DeltatuneError


def _train(args: argparse.Namespace) -> int:
    from ..train import load_train_config, train

    cfg = load_train_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(
            f"trained {result.steps} steps ({result.seconds_per_step:.2f} s/step, peak RSS {result.peak_rss_mib:.0f} MiB)"
        )
        print(result.trainable)
        best = (
            f"{cfg.eval.metric}={result.best_metric:.4f} at step {result.best_step}"
            if result.best_step
            else "n/a"
        )
        print(f"best validation {best}{' (stopped early)' if result.stopped_early else ''}")
        print(
            f"saved: {result.saved_to}\nmetrics: {result.output_dir / 'metrics.jsonl'}\nplot: {result.output_dir / 'curves.png'}"
        )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..train import evaluate_adapter, load_train_config

    cfg = load_train_config(args.config, args.overrides)
    metrics = evaluate_adapter(cfg, None if args.base_only else args.adapter)
    print(json.dumps(metrics, indent=2))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from ..generation import Generator

    base, system, template = args.base, args.system, None
    if args.config is not None:  # the prompt format the adapter was trained with
        from ..train import load_train_config

        cfg = load_train_config(args.config)
        base = base or cfg.model.path
        system = system or cfg.data.system_prompt
        template = cfg.data.instruction_template
    if base is None:
        raise SystemExit("deltatune generate: give --base (or --config)")
    generator = Generator(base, args.adapter, system_prompt=system, template=template)
    if args.prompt:
        for prompt in args.prompt:
            print(generator(prompt, max_new_tokens=args.max_new_tokens))
        return 0
    print("reading prompts, one per line; an empty line or Ctrl-D ends", file=sys.stderr)
    lines = sys.stdin if not sys.stdin.isatty() else iter(lambda: input("> "), "")
    for line in lines:
        if not line.strip():
            break
        print(generator(line.strip(), max_new_tokens=args.max_new_tokens), flush=True)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ..core.inspect import describe_adapter

    print(describe_adapter(Path(args.adapter)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an adapter (or method: full) from a YAML config")
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate an adapter on the config's validation split")
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--adapter", type=Path)
    group.add_argument("--base-only", action="store_true", help="evaluate the base model without an adapter")
    p.set_defaults(func=_eval)

    p = sub.add_parser("generate", help="generate with base + adapter; no prompt: read prompts from stdin")
    p.add_argument("--base", help="model folder, hub id, or a bundled name (smollm2)")
    p.add_argument("--adapter", type=Path)
    p.add_argument(
        "--config",
        type=Path,
        help="training config: its model, system prompt and instruction_template ({text})",
    )
    p.add_argument("--system", default=None, help="system prompt for chat models")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("prompt", nargs="*")
    p.set_defaults(func=_generate)

    p = sub.add_parser("inspect", help="print an adapter's config, provenance, sizes and parameter counts")
    p.add_argument("adapter")
    p.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow the flags (`train c.yaml --resume optim.lr=0.1`), which argparse won't intermix.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except DeltatuneError as exc:
        print(f"deltatune {args.command}: error: {exc}", file=sys.stderr)
        return 2
