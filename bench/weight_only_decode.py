"""int8 / int4 weight-only bases (`--quantize`, runtime.weight_only) against the bf16 base and llama.cpp, side by
side in one process.

`decode`: the bundled SmolLM2-135M-Instruct loaded in bf16, three ways: as it is, packed int8 (per-row
scales) and packed int4 (groups of 32), each with the quickstart's float32 adapter loaded on top unmerged.
One chat prompt, greedy, `--tokens` new tokens, 2 threads: the eager engine (`DecodeBatch`) with the adapter
and without, 16 streams at once (16 tweets) with it, and the compiled step (`runtime.compiled`; compiling is
done before the timed rounds) with it; llama.cpp (when llama-cpp-python is installed: `make gguf-check` builds
it) decodes the merged model's f16 and q8_0 GGUF files. Medians of interleaved rounds; resident weight bytes;
greedy tokens compared with llama.cpp's f16 file's up to the first difference.

`answers`: the quickstart's evaluation (examples/quickstart.yaml: 308 held-out tweets, greedy) with the adapter
on the fp32 base, the bf16 base, and the packed int8 / int4 bases: its metrics, how many answers equal the
fp32 base's, and the seconds its generations took.

    python bench/weight_only_decode.py decode [--adapter outputs/quickstart/adapter] [--tokens 64] [--reps 3]
    python bench/weight_only_decode.py answers [--adapter outputs/quickstart/adapter]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import compiled_decode, engine_rate  # noqa: E402
from decode_vs_llamacpp import TWEETS, _llama_rate  # noqa: E402

SCHEMES = ("bf16", "int8", "int4")


def _model(scheme: str, adapter: Path, dtype: torch.dtype = torch.bfloat16):
    """SmolLM2 in `dtype`, packed as `scheme` says (bf16 / float32: not packed), the adapter as "tuned"."""
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.models.bundled import smollm2_path
    from deltatune.runtime.weight_only import quantize_weights

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype).eval().requires_grad_(False)
    if scheme in ("int8", "int4"):
        quantize_weights(model, scheme)
    with warnings.catch_warnings():  # (saved on a float32 base: known here)
        warnings.simplefilter("ignore")
        dt.load_adapter(model, adapter, adapter_name="tuned")
    return model.requires_grad_(False)


def _weight_mib(model) -> float:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20


def _decode(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from deltatune.models.bundled import smollm2_path
    from deltatune.runtime.compiled import CompiledDecoder

    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())

    def chat(text: str) -> list[int]:
        messages = [{"role": "user", "content": f"Tell me about this tweet: {text}"}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]

    prompt, many = chat(TWEETS[0]), [chat(t) for t in TWEETS]
    models = {scheme: _model(scheme, args.adapter) for scheme in SCHEMES}
    llamas = _llamas(args.adapter, tokenizer)
    decoders, compile_s = {}, {}
    for scheme, model in models.items():
        decoders[scheme] = CompiledDecoder(model, "tuned")
        started = time.perf_counter()
        compiled_decode(decoders[scheme], prompt, 8)
        compile_s[scheme] = round(time.perf_counter() - started)
    rates: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}
    for rep in range(args.reps):
        for scheme in SCHEMES if rep % 2 == 0 else SCHEMES[::-1]:
            model = models[scheme]
            rates.setdefault(f"{scheme} eager lora", []).append(
                engine_rate(model, [prompt], "tuned", args.tokens)
            )
            rates.setdefault(f"{scheme} eager base", []).append(
                engine_rate(model, [prompt], None, args.tokens)
            )
            rates.setdefault(f"{scheme} eager lora x16", []).append(
                engine_rate(model, many, "tuned", args.tokens)
            )
            seconds, tokens[scheme] = compiled_decode(decoders[scheme], prompt, args.tokens)
            rates.setdefault(f"{scheme} compiled lora", []).append(1 / seconds)
        for kind, llm in llamas.items():
            rate, tokens[f"llama.cpp {kind}"] = _llama_rate(llm, prompt, args.tokens)
            rates.setdefault(f"llama.cpp {kind}", []).append(rate)
    medians = {name: round(statistics.median(r), 1) for name, r in rates.items()}
    result: dict = {"tokens_per_s": medians, "compile_s": compile_s}
    result["weight_mib"] = {scheme: round(_weight_mib(m)) for scheme, m in models.items()}
    if "llama.cpp f16" in tokens:
        reference = tokens["llama.cpp f16"]
        result["compiled_tokens_equal_llama_f16"] = {
            scheme: f"{_agreeing(tokens[scheme], reference)}/{len(reference)}" for scheme in SCHEMES
        }
    if "llama.cpp q8_0" in medians:
        q8 = medians["llama.cpp q8_0"]
        result["compiled_lora_x_llama_q8_0"] = {
            s: round(medians[f"{s} compiled lora"] / q8, 2) for s in SCHEMES
        }
        result["sixteen_streams_x_llama_q8_0_single"] = {
            s: round(medians[f"{s} eager lora x16"] / q8, 2) for s in SCHEMES
        }
    return result


def _agreeing(mine: list[int], other: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(mine, other, strict=False)) if a != b), len(other))


def _llamas(adapter: Path, tokenizer) -> dict:
    """llama.cpp on the merged model's f16 and q8_0 GGUF files, or nothing where llama-cpp-python is absent."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print(
            "llama-cpp-python is not installed (make gguf-check builds it): llama.cpp not measured",
            file=sys.stderr,
        )
        return {}
    from deltatune.gguf import write_gguf_model

    fp32 = _model("float32", adapter, torch.float32)
    files = Path(tempfile.mkdtemp(prefix="weight-only-"))
    llamas = {}
    for kind in ("f16", "q8_0"):
        write_gguf_model(fp32, tokenizer, files / f"merged-{kind}.gguf", tensor_type=kind)
        llamas[kind] = Llama(
            model_path=str(files / f"merged-{kind}.gguf"), n_ctx=512, n_threads=2, verbose=False
        )
    return llamas


def _answers(args: argparse.Namespace) -> dict:
    """The quickstart's evaluation on each base: `train.load_model` is wrapped so the model it loads is cast to
    bf16 and packed as the variant says, before the adapter loads (as `serve --quantize` does)."""
    import deltatune.train as train_module
    from deltatune.runtime.weight_only import quantize_weights
    from deltatune.task import metrics as evaluation
    from deltatune.train import evaluate_adapter, load_train_config

    cfg = load_train_config(Path(__file__).parents[1] / "examples" / "quickstart.yaml", [])
    original_load, original_answers = train_module.load_model, evaluation.generate_answers
    result: dict = {}
    answers: dict[str, list[str]] = {}
    for variant in ("float32", "bf16", "int8", "int4"):

        def load(*a, variant=variant, **k):
            model = original_load(*a, **k)
            if variant != "float32":
                model.to(torch.bfloat16).requires_grad_(False)
            if variant in ("int8", "int4"):
                quantize_weights(model, variant)
            return model

        seconds: list[float] = []

        def timed(*a, variant=variant, seconds=seconds, **k):
            started = time.perf_counter()
            answers[variant] = original_answers(*a, **k)
            seconds.append(time.perf_counter() - started)
            return answers[variant]

        train_module.load_model, evaluation.generate_answers = load, timed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics = evaluate_adapter(cfg, str(args.adapter), loss=False)
        train_module.load_model, evaluation.generate_answers = original_load, original_answers
        same = sum(a == b for a, b in zip(answers[variant], answers["float32"], strict=True))
        result[variant] = {
            "metrics": metrics,
            "answers_equal_float32": f"{same}/{len(answers['float32'])}",
            "generation_s": round(sum(seconds), 1),
        }
        print(variant, json.dumps(result[variant]), file=sys.stderr, flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["decode", "answers"])
    parser.add_argument("--adapter", type=Path, default=Path("outputs/quickstart/adapter"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    result = _decode(args) if args.what == "decode" else _answers(args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
