"""An adapter's products on a packed int8 / int4 base: in float32 (as built) against bf16 (as before), side by
side in one process, with the float32 base beside them.

The bundled SmolLM2-135M-Instruct: in float32, and in bf16 packed int8 / int4 (`runtime.weight_only`), the
quickstart's adapter on top unmerged. On a packed base the adapter's products run in the adapter's own dtype;
loaded as saved that is float32 (`LoraLinear._packed_inference_forward`, and per-row stacks in mixed batches),
and the `bf16 products` variants cast the adapter to bf16, which makes every product run in bf16 as all did
before. One chat prompt (one stream) and 16 tweets (16 streams) through the eager engine (`DecodeBatch`),
greedy, `--tokens` new tokens, 2 threads, medians of interleaved rounds; llama.cpp's q8_0 file of the merged
model (when llama-cpp-python is installed: `make gguf-check` builds it) for scale. Says whether the CPU has
native bf16 (AVX512-BF16 / AMX): without it torch emulates bf16 products.

    python bench/packed_adapter_dtype.py [--adapter outputs/quickstart/adapter] [--tokens 32] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import engine_rate  # noqa: E402
from decode_vs_llamacpp import TWEETS, _llama_rate  # noqa: E402
from weight_only_decode import _llamas, _model  # noqa: E402


def main() -> int:
    from transformers import AutoTokenizer

    from deltatune.models.bundled import smollm2_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, default=Path("outputs/quickstart/adapter"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())

    def chat(text: str) -> list[int]:
        messages = [{"role": "user", "content": f"Tell me about this tweet: {text}"}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]

    prompt, many = chat(TWEETS[0]), [chat(t) for t in TWEETS[:16]]
    models = {"fp32 base": _model("fp32", args.adapter, torch.float32)}
    for scheme in ("int8", "int4"):
        models[f"{scheme}, float32 products"] = _model(scheme, args.adapter)
        models[f"{scheme}, bf16 products"] = _bf16_adapter(_model(scheme, args.adapter))
    llamas = {k: v for k, v in _llamas(args.adapter, tokenizer).items() if k == "q8_0"}
    rates: dict[str, list[float]] = {}
    names = list(models)
    for rep in range(args.reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            model = models[name]
            rates.setdefault(f"{name}: one stream", []).append(
                engine_rate(model, [prompt], "tuned", args.tokens)
            )
            rates.setdefault(f"{name}: 16 streams", []).append(engine_rate(model, many, "tuned", args.tokens))
        for kind, llm in llamas.items():
            rates.setdefault(f"llama.cpp {kind}: one stream", []).append(
                _llama_rate(llm, prompt, args.tokens)[0]
            )
        print(f"round {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)
    medians = {name: round(statistics.median(r), 1) for name, r in rates.items()}
    gains = {
        f"{scheme} {streams}": round(
            medians[f"{scheme}, float32 products: {streams}"]
            / medians[f"{scheme}, bf16 products: {streams}"],
            2,
        )
        for scheme in ("int8", "int4")
        for streams in ("one stream", "16 streams")
    }
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    result = {
        "cpu": {"capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native},
        "tokens_per_s": medians,
        "float32_products_x_bf16_products": gains,
    }
    print(json.dumps(result, indent=2))
    return 0


def _bf16_adapter(model: torch.nn.Module) -> torch.nn.Module:
    """The adapter cast to bf16: on a packed base its products then run in bf16, as they all did before."""
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.bfloat16()
    return model


if __name__ == "__main__":
    raise SystemExit(main())
