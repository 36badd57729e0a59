"""The subcommands that turn adapters into other artifacts: combine (arithmetic), convert (to plain LoRA),
export (a merged transformers folder, a GGUF model, or a llama.cpp LoRA file)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .arguments import positive_int


def add_adapter_parsers(sub: Any) -> None:
    _add_combine_parser(sub)
    _add_convert_parser(sub)
    _add_export_parser(sub)


def _load_base(name: str, tokenizer_required: bool = False) -> tuple[Any, Any]:
    """The base model in float32, and its tokenizer: needed to write GGUF, otherwise only recorded (a model
    folder without one still combines and converts)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models.loading import load_pretrained, load_tokenizer_from

    model = load_pretrained(AutoModelForCausalLM, name, dtype=torch.float32).eval()
    try:
        tokenizer = load_tokenizer_from(name)
    except (OSError, ValueError, TypeError):
        if tokenizer_required:
            raise
        tokenizer = None
    return model, tokenizer


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _add_check_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-logit-check",
        dest="check_logits",
        action="store_false",
        help="skip measuring the logits against the exact update (saves holding every module's exact ΔW)",
    )


def _add_size_flags(p: argparse.ArgumentParser) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--rank", type=positive_int, help="rank of the written LoRA (truncated SVD)")
    size.add_argument(
        "--energy", type=_share, help="per module, the smallest rank keeping this share of Σσ² (e.g. 0.99)"
    )


TRUNCATION_WARNING = 0.10  # a module whose written update is off its exact one by more than this is named
GROWTH_WARNING = 2.0  # an output this many times the inputs' size is said to have grown


def _print_report(report: Any, inputs: list[Path]) -> int:
    from ..core.io import WEIGHTS_NAME, resolve_safetensors_adapter

    logits = report.logits or {}
    written = (report.path / WEIGHTS_NAME).stat().st_size
    read = sum((resolve_safetensors_adapter(p) / WEIGHTS_NAME).stat().st_size for p in inputs)
    print(
        f"wrote {report.path}: {report.method}, r={report.rank} (ranks {min(report.ranks.values())}-"
        f"{max(report.ranks.values())}), max relative truncation error {report.max_relative_error:.3g}; "
        f"{_mib(written)} (from {_mib(read)}: {written / max(read, 1):.2f}x)"
    )
    worst = max(report.relative_errors, key=report.relative_errors.get, default=None)
    if worst is not None and report.relative_errors[worst] > TRUNCATION_WARNING:
        lossy = sum(e > TRUNCATION_WARNING for e in report.relative_errors.values())
        print(
            f"warning: at these ranks {lossy} of {len(report.relative_errors)} modules are off their exact "
            f"update by over {TRUNCATION_WARNING:.0%} (worst {worst}: {report.relative_errors[worst]:.0%}); raise "
            "--rank, or give --energy 0.99 to choose each module's rank",
            file=sys.stderr,
        )
    if written > GROWTH_WARNING * read:
        print(
            f"warning: the written adapter is {written / read:.1f}x the size of what it was made from; a lower "
            "--rank or --energy makes it smaller, at the truncation error printed above",
            file=sys.stderr,
        )
    if logits:
        print(
            f"logits vs the exact combination on {logits['sample']}: max |error| {logits['max_abs_error']:.3g} "
            f"(the exact update moves them by up to {logits['exact_max_abs_effect']:.3g})"
        )
    return 0


def _combine(args: argparse.Namespace) -> int:
    from ..combine import combine_adapters

    model, tokenizer = _load_base(args.base)
    report = combine_adapters(
        model, args.adapters, args.out, weights=args.weights, method=args.method, rank=args.rank,
        energy=args.energy, density=args.density, sign_rule=args.sign_rule, seed=args.seed,
        check_logits=args.check_logits, tokenizer=tokenizer, allow_base_mismatch=args.allow_base_mismatch,
    )  # fmt: skip
    return _print_report(report, list(args.adapters))


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


def _add_combine_parser(sub: Any) -> None:
    from ..combine.options import METHODS, SIGN_RULES

    p = sub.add_parser("combine", help="combine adapters on their exact weight deltas into one LoRA adapter")
    p.add_argument("adapters", nargs="+", type=Path, help="adapter folders, all for --base")
    p.add_argument("--base", required=True, help="model folder, hub id, or a bundled name (smollm2)")
    p.add_argument("--out", required=True, type=Path, help="the new adapter folder")
    p.add_argument("--method", choices=METHODS, default="linear")
    p.add_argument(
        "--weights", type=float, nargs="+", help="one per adapter (default 1 each); negative subtracts a task"
    )
    _add_size_flags(p)
    p.add_argument("--density", type=_share, default=0.5, help="ties / dare / magnitude_prune: share kept")
    p.add_argument("--sign-rule", choices=SIGN_RULES, default="total", help="ties / dare_ties sign election")
    p.add_argument("--seed", type=int, default=0, help="dare's random drop")
    _add_check_flag(p)
    p.add_argument("--allow-base-mismatch", action="store_true")
    p.set_defaults(func=_combine)


def _convert(args: argparse.Namespace) -> int:
    from ..combine import convert_adapter

    model, tokenizer = _load_base(args.base)
    report = convert_adapter(
        model, args.adapter, args.out, rank=args.rank, energy=args.energy,
        modules_to_save=args.modules_to_save, check_logits=args.check_logits, tokenizer=tokenizer,
        allow_base_mismatch=args.allow_base_mismatch,
    )  # fmt: skip
    return _print_report(report, [args.adapter])


def _add_convert_parser(sub: Any) -> None:
    p = sub.add_parser(
        "convert", help="rewrite an adapter (DoRA, rsLoRA, IA3, ...) as a plain LoRA with one lora_alpha"
    )
    p.add_argument("--base", required=True, help="model folder, hub id, or a bundled name (smollm2)")
    p.add_argument("--adapter", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    _add_size_flags(p)
    from ..combine.options import MODULES_TO_SAVE_CHOICES

    p.add_argument(
        "--modules-to-save",
        choices=MODULES_TO_SAVE_CHOICES,
        default="refuse",
        help="full trained module copies: refuse (vLLM-style engines reject them) or split into a side file",
    )
    _add_check_flag(p)
    p.add_argument("--allow-base-mismatch", action="store_true")
    p.set_defaults(func=_convert)


def _export(args: argparse.Namespace) -> int:
    import deltatune as dt

    model, tokenizer = _load_base(args.base, tokenizer_required=args.format == "gguf")
    if args.format == "gguf-lora":
        from ..gguf import export_gguf_lora

        if args.adapter is None:
            raise SystemExit("deltatune export: error: --format gguf-lora needs --adapter")
        report = export_gguf_lora(
            model, args.adapter, args.out, rank=args.rank, energy=args.energy,
            allow_base_mismatch=args.allow_base_mismatch,
        )  # fmt: skip
        print(f"wrote {report['path']}: {report['modules']} modules, lora alpha {report['alpha']:g}")
        return 0
    if args.adapter is not None:
        dt.load_adapter(model, args.adapter, allow_base_mismatch=args.allow_base_mismatch)
    if args.format == "hf":
        report = dt.export_merged(model, args.out, tokenizer)
        print(f"wrote {args.out}: merged, max |logit error| {report.max_abs_error:.3g}")
        return 0
    from ..gguf import write_gguf_model

    report = write_gguf_model(
        model, tokenizer, args.out, tensor_type=args.type, pre_tokenizer=args.pre_tokenizer
    )
    print(f"wrote {report['path']}: {report['tensors']}, pre-tokenizer {report['pre_tokenizer']}")
    if not report["pre_tokenizer_known"]:
        print(
            "note: this tokenizer is not in deltatune's list, so llama.cpp will split text with its 'default' "
            "rule, which may differ from transformers; pass --pre-tokenizer NAME (llama.cpp's name) if you know it"
        )
    return 0


def _add_export_parser(sub: Any) -> None:
    from ..gguf import TENSOR_TYPES

    p = sub.add_parser(
        "export",
        help="the model with an adapter merged (transformers folder or GGUF), or a llama.cpp LoRA file",
    )
    p.add_argument("--base", required=True, help="model folder, hub id, or a bundled name (smollm2)")
    p.add_argument("--adapter", type=Path, help="adapter folder to merge (or, for gguf-lora, to write)")
    p.add_argument("--out", required=True, type=Path, help="a folder (hf) or a .gguf file")
    p.add_argument(
        "--format",
        choices=("hf", "gguf", "gguf-lora"),
        default="hf",
        help="hf: merged transformers folder; gguf: merged model for llama.cpp; gguf-lora: the adapter for llama.cpp",
    )
    p.add_argument("--type", choices=TENSOR_TYPES, default="f16", help="gguf: how matrices are stored")
    p.add_argument("--pre-tokenizer", help="gguf: llama.cpp's pre-tokenizer name, when deltatune cannot tell")
    _add_size_flags(p)
    p.add_argument("--allow-base-mismatch", action="store_true")
    p.set_defaults(func=_export)
