"""`deltatune forgetting`: load a base with an adapter (or a fully fine-tuned model beside its base), read a
general corpus, measure (`forgetting.py`) and write forgetting.json / .md / .png in one atomic step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core import provenance
from ..core.errors import AdapterNotFoundError
from ..core.hashing import sha256_file
from ..data.corpora import DEFAULT_CORPUS, read_corpus
from .forgetting import GENERAL_PROMPTS, ForgettingSettings, forgetting_metrics
from .report_folder import write_report_folder


def read_prompts(source: str | Path | None) -> list[str]:
    if source is None:
        return list(GENERAL_PROMPTS)
    texts, _ = read_corpus(source)
    return texts


def measure_forgetting(
    base: str,
    adapter: str | Path | None = None,
    *,
    model: str | Path | None = None,
    corpus: str | Path = DEFAULT_CORPUS,
    prompts: str | Path | None = None,
    settings: ForgettingSettings | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Forgetting of `adapter` on `base`, or of the fully fine-tuned `model` folder against `base`: KL,
    perplexities and changed greedy answers (module docstring of forgetting.py); returns the report and
    writes it to the folder `out` when given."""
    from transformers import AutoModelForCausalLM

    from ..core.devices import resolve_device
    from ..core.io import WEIGHTS_NAME, load_adapter, resolve_safetensors_adapter
    from ..models.loading import load_pretrained, load_tokenizer_from
    from .latency import hardware

    if (adapter is None) == (model is None):
        raise ValueError("give exactly one of an adapter folder (--adapter) or a fine-tuned model (--model)")
    settings = settings or ForgettingSettings()
    texts, corpus_sha = read_corpus(corpus)
    general = read_prompts(prompts)
    where = resolve_device(device)
    tokenizer = load_tokenizer_from(base)
    subject: dict[str, Any]
    reference = None
    if adapter is not None:
        folder = resolve_safetensors_adapter(adapter)
        tuned = load_pretrained(AutoModelForCausalLM, base, dtype=torch.float32)
        load_adapter(tuned, folder, tokenizer=tokenizer)
        subject = {
            "adapter": str(folder),
            "adapter_sha256": sha256_file(folder / WEIGHTS_NAME),
        }
    else:
        tuned = load_pretrained(AutoModelForCausalLM, str(model), dtype=torch.float32)
        reference = load_pretrained(AutoModelForCausalLM, base, dtype=torch.float32).to(where).eval()
        subject = {"model": str(model), "model_sha256": _weights_sha256(Path(model))}
    tuned.to(where).eval()
    metrics, kl = forgetting_metrics(
        tuned, tokenizer, texts, general, reference=reference, settings=settings, progress=progress
    )
    report = {
        **metrics,
        "settings": settings.as_dict(),
        "provenance": provenance.record(
            base=base,
            **subject,
            corpus=str(corpus),
            corpus_sha256=corpus_sha,
            prompts=str(prompts) if prompts else "built-in general prompts",
            hardware=hardware(where),
        ),  # fmt: skip
    }
    if out is not None:
        write_report(Path(out), report, kl)
    return report


def _weights_sha256(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise AdapterNotFoundError(f"{folder} has no *.safetensors weights; is it a model folder?")
    return sha256_file(*files)


def table(report: dict[str, Any]) -> str:
    t, a = report["text"], report.get("answers")
    who = report["provenance"].get("adapter") or report["provenance"].get("model")
    lines = [
        f"{who} against its base, on {t['tokens']} tokens of general text ({report['provenance']['corpus']})",
        "",
        "| measure | value |",
        "|---|---|",
        f"| KL(base ‖ adapted) per token, mean | {t['kl_mean']:.4f} nats |",
        f"| KL per token, p95 | {t['kl_p95']:.4f} nats |",
        f"| perplexity, base → adapted | {t['perplexity_base']:.2f} → {t['perplexity_adapted']:.2f} "
        f"(x{t['perplexity_ratio']:.3f}) |",
    ]
    if a:
        lines.append(f"| greedy answers changed | {a['changed_share']:.0%} of {a['prompts']} prompts |")
        lines.append(f"| ... from the first token | {a['first_token_changed_share']:.0%} |")
        lines.append(
            f"| base answer kept from the start (mean share of its tokens) | {a['kept_prefix_share']:.0%} |"
        )
        for ex in a["examples"][:3]:
            lines += ["", f"- *{ex['prompt']}*  base: {ex['base'][:80]!r}  adapted: {ex['adapted'][:80]!r}"]
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any], kl: torch.Tensor) -> None:
    """forgetting.json, forgetting.md and forgetting.png (the per-token KL histogram), all or nothing."""
    write_report_folder(out, "forgetting", report, "# Forgetting\n\n" + table(report), lambda p: _plot(kl, p))


def _plot(kl: torch.Tensor, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    values = kl.clamp_min(1e-6).log10().numpy()
    ax.hist(values, bins=50)
    ax.set_xlabel("log10 KL(base || adapted) per token (nats)")
    ax.set_ylabel("tokens")
    ax.set_title(f"mean {float(kl.mean()):.4f}, p95 {float(torch.quantile(kl.double(), 0.95)):.4f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
