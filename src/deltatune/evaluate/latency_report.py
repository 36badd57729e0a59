"""`deltatune bench`: load a base and an adapter, measure the variants (`latency.py`), and write the report
folder (latency.json with provenance, latency.md, latency.png) in one atomic step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core import provenance
from ..core.devices import resolve_device
from ..core.hashing import sha256_file
from .latency import (
    NOISY_P99_OVER_P50,
    LatencySettings,
    adapter_load_seconds,
    build_variants,
    hardware,
    logit_errors,
    measure,
    summarize,
)  # fmt: skip
from .report_folder import write_report_folder


def measure_latency(
    base: str,
    adapter: str | Path,
    settings: LatencySettings | None = None,
    *,
    out: str | Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Measure base / unmerged / merged / quantized-base latency for `adapter` on `base` (a model folder,
    bundled name or hub id); returns the report, and writes it to the folder `out` when given."""
    from transformers import AutoModelForCausalLM

    from ..core.io import WEIGHTS_NAME, resolve_safetensors_adapter
    from ..models.loading import load_pretrained

    settings = settings or LatencySettings()
    adapter_dir = resolve_safetensors_adapter(adapter)
    where = resolve_device(device)
    model = load_pretrained(AutoModelForCausalLM, base, dtype=torch.float32).eval()
    variants = build_variants(model, adapter_dir, settings)
    wanted = [v for v in variants if v.name in settings.variants]
    with torch.no_grad():
        measure(wanted, settings, where, model.config.vocab_size)
        load_s = adapter_load_seconds(model, adapter_dir, settings.reps)  # `model` is the unmerged variant
        errors = logit_errors(variants, settings, where, model.config.vocab_size)
    report = summarize(wanted, settings, load_s)
    report["logit_error_vs_unmerged"] = {name: e for name, e in errors.items() if name in settings.variants}
    report["provenance"] = provenance.record(
        base=base, adapter=str(adapter_dir), adapter_sha256=sha256_file(adapter_dir / WEIGHTS_NAME),
        hardware=hardware(where),
    )  # fmt: skip
    if out is not None:
        write_report(Path(out), report)
    return report


def table(report: dict[str, Any]) -> str:
    """The report as a markdown table, ratios to the base beside each time."""
    s = report["settings"]
    lines = [
        f"{s['prompt_tokens']}-token prompts, {s['new_tokens']} new tokens, greedy, median of {s['reps']} "
        f"interleaved rounds; x base: ratio to the base in the same run",
        "",
        "| variant | batch | first token ms (x base) | per token ms (x base) | tokens/s | request p50 / p99 ms | "
        "weights MiB | extra peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | skipped: {r['skipped']} | | | | | | |")
            continue
        working = "n/a" if r["working_mib"] is None else f"{r['working_mib']:.0f}"
        lines.append(
            f"| {r['variant']} | {r['batch']} | {1e3 * r['first_token_s']:.1f} ({r['first_token_s_x_base']:.2f}) | "
            f"{1e3 * r['per_token_s']:.1f} ({r['per_token_s_x_base']:.2f}) | {r['tokens_per_s']:.1f} | "
            f"{1e3 * r['request_p50_s']:.0f} / {1e3 * r['request_p99_s']:.0f} | {r['weight_mib']:.0f} | {working} |"
        )
    load = report["adapter_load_s"]
    lines += ["", f"adapter load + activate: {1e3 * load['median']:.0f} ms median "
              f"({1e3 * load['min']:.0f}-{1e3 * load['max']:.0f})"]  # fmt: skip
    lines.append(
        "extra peak MiB: the resident peak while the variant ran, above what was resident before it (CUDA: "
        "the allocator's peak); on CPU the allocator reuses memory earlier variants freed, so it is a lower bound"
    )
    for name, e in report.get("logit_error_vs_unmerged", {}).items():
        lines.append(
            f"{name} against unmerged float32, next-token logits: max |diff| {e['max_abs']:.3g}, mean "
            f"{e['mean_abs']:.3g}, same top token at {100 * e['top1_agreement']:.1f}% of positions"
        )
    if report.get("noisy"):
        lines.append(
            f"warning: the machine was busy while {', '.join(report['noisy'])} ran (p99 over "
            f"{NOISY_P99_OVER_P50}x p50): measure again on a quiet machine before trusting these numbers"
        )
    hw = report["provenance"]["hardware"]
    lines.append(f"measured on: {hw['cpu']}, {hw['cores']} cores, {hw['torch_threads']} torch threads, {hw['device']}"
                 + (f" ({hw['gpu']})" if "gpu" in hw else ""))  # fmt: skip
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any]) -> None:
    """latency.json, latency.md and latency.png, all or nothing."""
    write_report_folder(out, "latency", report, "# Latency\n\n" + table(report), lambda p: _plot(report, p))


def _plot(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    rows = [r for r in report["rows"] if "skipped" not in r]
    batches = sorted({r["batch"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig = Figure(figsize=(9, 3.8))
    axes = fig.subplots(1, 2)
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        mine = {r["batch"]: r for r in rows if r["variant"] == variant}
        xs = [j + i * width for j in range(len(batches))]
        axes[0].bar(xs, [1e3 * mine[b]["first_token_s"] for b in batches], width, label=variant)
        axes[1].bar(xs, [1e3 * mine[b]["per_token_s"] for b in batches], width, label=variant)
    for ax, title in zip(axes, ("time to first token (ms)", "time per further token (ms)"), strict=True):
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(batches))])
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_title(title)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
