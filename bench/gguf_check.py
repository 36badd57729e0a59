"""The GGUF files deltatune writes, checked by their real consumer: llama.cpp (through llama-cpp-python).

For the bundled SmolLM2 and a LoRA adapter (the quickstart's if given, else a random all-linear r=8 one
whose update moves the logits by about as much as a trained one), writes:
  merged-{f32,f16,q8_0}.gguf         the model with the adapter merged
  base-f16.gguf + lora.gguf          the base and the adapter as a llama.cpp LoRA file
then runs the same token ids through llama.cpp and transformers and compares the last-position logits of
each prompt (max |difference|, top-1 agreement, top-5 overlap) and up to 24 greedy tokens (counted up
to the first difference, over the tokens both produced: transformers stops at end-of-sequence). Exits 1 when a number
is outside the tolerance for its type (TOLERANCE below).

Run: make gguf-check   (installs llama-cpp-python from the wheel cache, building it once: ~9 minutes)
     .venv/bin/python bench/gguf_check.py [--adapter outputs/quickstart/adapter] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Classify the sentiment of this tweet: I love rainy mornings with coffee.",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
GREEDY_TOKENS = 24
# per file: max |logit difference| relative to the logits' range, the share of prompts whose top token must
# agree, and the share of greedy tokens that must be equal
TOLERANCE = {
    "f32": (0.01, 1.0, 1.0),
    "f16": (0.02, 1.0, 1.0),
    "q8_0": (0.05, 0.8, 0.5),
    "lora": (0.02, 1.0, 1.0),
}


def _random_adapter(model, folder: Path) -> Path:
    import deltatune as dt

    torch.manual_seed(0)
    dt.inject(model, dt.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True), "a")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    dt.save_adapter(model, folder, "a")
    dt.eject(model, merge=False)
    return folder


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()


def _hf_greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False)
    return out[0, len(ids) :].tolist()


def _llama(path: Path, lora: Path | None = None):
    from llama_cpp import Llama

    return Llama(
        model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=256, logits_all=True,
        verbose=False, seed=0, n_threads=2,
    )  # fmt: skip


def _cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)


def _cpp_greedy(llm, ids: list[int]) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == GREEDY_TOKENS:
            break
    return out


def _compare(kind: str, llm, model, prompts: list[list[int]]) -> dict:
    errors, ranges, top1, top5, greedy_same, compared = [], [], 0, [], 0, 0
    for ids in prompts:
        ours, theirs = _hf_logits(model, ids), _cpp_logits(llm, ids)
        errors.append(float(np.abs(ours - theirs).max()))
        ranges.append(float(ours.max() - ours.min()))
        top1 += int(ours.argmax() == theirs.argmax())
        top5.append(len(set(np.argsort(-ours)[:5]) & set(np.argsort(-theirs)[:5])) / 5)
        a, b = _hf_greedy(model, ids), _cpp_greedy(llm, ids)
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        greedy_same += same
        compared += min(
            len(a), len(b)
        )  # transformers stops at end-of-sequence; llama.cpp's generator does not
    limit, agree, greedy = TOLERANCE[kind]
    result = {
        "max_abs_logit_error": max(errors),
        "relative_error": max(e / r for e, r in zip(errors, ranges, strict=True)),
        "top1_agreement": top1 / len(prompts),
        "top5_overlap": float(np.mean(top5)),
        "greedy_tokens_equal": f"{greedy_same}/{compared}",
    }
    result["ok"] = (
        result["relative_error"] <= limit
        and result["top1_agreement"] >= agree
        and greedy_same >= greedy * compared
    )
    return result


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deltatune as dt
    from deltatune.gguf import export_gguf_lora, write_gguf_model
    from deltatune.models.bundled import smollm2_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, help="adapter folder (default: a random r=8 rsLoRA)")
    parser.add_argument("--out", type=Path, help="keep the GGUF files here (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="gguf-check-"))
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    adapter = args.adapter or _random_adapter(model, out / "adapter")
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]

    results = {}
    lora = export_gguf_lora(model, adapter, out / "lora.gguf")
    write_gguf_model(model, tokenizer, out / "base-f16.gguf", tensor_type="f16")
    dt.load_adapter(model, adapter)
    for kind in ("f32", "f16", "q8_0"):
        write_gguf_model(model, tokenizer, out / f"merged-{kind}.gguf", tensor_type=kind)
        results[kind] = _compare(kind, _llama(out / f"merged-{kind}.gguf"), model, prompts)
    results["lora"] = _compare("lora", _llama(out / "base-f16.gguf", out / "lora.gguf"), model, prompts)
    results["lora"]["alpha"] = lora["alpha"]
    effect = []
    for ids in prompts:
        adapted = _hf_logits(model, ids)
        with dt.disable_adapter(model):
            effect.append(float(np.abs(adapted - _hf_logits(model, ids)).max()))
    results["adapter_effect"] = {"max_abs_logit_change": max(effect)}
    print(json.dumps(results, indent=2))
    print(f"files: {out}")
    return 0 if all(r.get("ok", True) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
