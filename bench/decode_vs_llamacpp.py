"""deltatune's decode engine against llama.cpp on the same model and adapter, side by side in one process.

The bundled SmolLM2-135M-Instruct with an adapter (default: the quickstart's, `make demo`): deltatune decodes
with it unmerged on the fp32 base (`DecodeBatch`, what the server, `generate` and evaluation run), and the base
alone; llama.cpp (llama-cpp-python, built once into ~/.cache/deltatune/wheels by `make gguf-check`) decodes the
GGUF files `deltatune export` writes of the merged model, f16 and q8_0, with 2 threads. One chat prompt, greedy,
`--tokens` new tokens; the rate is taken from the first new token to the last (the prompt's prefill apart),
median of interleaved repetitions; deltatune also through its compiled decode step (`runtime.compiled`, the
adapter unmerged in the model and folded into the compiled step's constants; its compiling is done before the
timed rounds). Then 16 streams at once on deltatune's engine (16 different tweets), in
aggregate. The same again on a bf16 base (`--dtype bfloat16`: the base loaded in bf16, the adapter kept in
float32), compiled and 16 streams. The greedy tokens of deltatune (fp32, compiled; bf16 compiled) and
llama.cpp's f16 file are compared up to the first difference.

    python bench/decode_vs_llamacpp.py [--adapter outputs/quickstart/adapter] [--tokens 64] [--reps 3]
                                       [--kinds f16,q8_0]

llama-cpp-python 0.3.36 built on a machine with AMX (Sapphire Rapids and later) segfaults decoding a q8_0 file
(2026-12-06, with 1 or 2 threads; f16 runs): pass `--kinds f16` there. On an AMD EPYC (AVX-512, no AMX) both
run (2026-12-07).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bf16_with_adapter, compiled_decode, engine_rate  # noqa: E402

TWEETS = [
    "my flight got cancelled again", "lovely morning at the lake", "the update moved every button",
    "watching the game tonight", "worst customer service ever", "new shoes feel great", "meh, it rained",
    "finally finished my thesis", "traffic is a nightmare", "coffee tastes burnt today", "best concert of my life",
    "the bus never came", "my cat knocked the plant over", "got the job!!", "lost my keys again", "quiet sunday",
]  # fmt: skip


def _llama_rate(llm, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    llm.reset()
    out, first = [], None
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(token))
        if first is None:
            first = time.perf_counter()
        if len(out) == tokens:
            break
    return (tokens - 1) / (time.perf_counter() - first), out


def main() -> int:
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deltatune as dt
    from deltatune.gguf import write_gguf_model
    from deltatune.models.bundled import smollm2_path
    from deltatune.runtime import generate
    from deltatune.runtime.compiled import CompiledDecoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, default=Path("outputs/quickstart/adapter"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--kinds", default="f16,q8_0", help="the GGUF tensor types llama.cpp decodes")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    dt.load_adapter(model, args.adapter, adapter_name="tuned")
    half = bf16_with_adapter(args.adapter)  # what --dtype bfloat16 loads

    def chat(text: str) -> list[int]:
        messages = [{"role": "user", "content": f"Tell me about this tweet: {text}"}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]

    prompt = chat(TWEETS[0])
    files = Path(tempfile.mkdtemp(prefix="decode-vs-llamacpp-"))
    llamas = {}
    kinds = args.kinds.split(",")
    for kind in kinds:  # the adapter merged, as `deltatune export --format gguf` writes it
        write_gguf_model(model, tokenizer, files / f"merged-{kind}.gguf", tensor_type=kind)
        llamas[kind] = Llama(
            model_path=str(files / f"merged-{kind}.gguf"), n_ctx=512, n_threads=2, verbose=False
        )

    compiled = CompiledDecoder(model, "tuned")
    compiled_decode(compiled, prompt, 8)  # compiles
    compiled_half = CompiledDecoder(half.requires_grad_(False), "tuned")
    compiled_decode(compiled_half, prompt, 8)
    rates: dict[str, list[float]] = {"deltatune lora": [], "deltatune base": [], "deltatune lora x16": []}
    rates |= {
        "deltatune lora compiled": [],
        "deltatune bf16 lora compiled": [],
        "deltatune bf16 lora x16": [],
    }
    rates |= {f"llama.cpp {kind}": [] for kind in kinds}
    theirs = []
    for _ in range(args.reps):
        rates["deltatune lora"].append(engine_rate(model, [prompt], "tuned", args.tokens))
        rates["deltatune base"].append(engine_rate(model, [prompt], None, args.tokens))
        seconds, compiled_tokens = compiled_decode(compiled, prompt, args.tokens)
        rates["deltatune lora compiled"].append(1 / seconds)
        seconds, half_tokens = compiled_decode(compiled_half, prompt, args.tokens)
        rates["deltatune bf16 lora compiled"].append(1 / seconds)
        for kind, llm in llamas.items():
            rate, theirs_now = _llama_rate(llm, prompt, args.tokens)
            rates[f"llama.cpp {kind}"].append(rate)
            theirs = theirs_now if kind == "f16" else theirs
        many = [chat(t) for t in TWEETS]
        rates["deltatune lora x16"].append(engine_rate(model, many, "tuned", args.tokens))
        rates["deltatune bf16 lora x16"].append(engine_rate(half, many, "tuned", args.tokens))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    (ours,) = generate(
        model, [prompt], ["tuned"], max_new_tokens=args.tokens, pad_token_id=0, eos_token_id=None
    )

    def agreeing(mine: list[int], other: list[int]) -> str:
        same = next((i for i, (a, b) in enumerate(zip(mine, other, strict=False)) if a != b), len(other))
        return f"{same}/{len(other)}"

    result = {
        "tokens_per_s": medians,
        "lora_time_per_token_x_base": medians["deltatune base"] / medians["deltatune lora"],
        "greedy_tokens_equal_f16": agreeing(ours.tokens, theirs) if "f16" in kinds else None,
        "compiled_tokens_equal_f16": agreeing(compiled_tokens, theirs) if "f16" in kinds else None,
        "bf16_compiled_tokens_equal_f16": agreeing(half_tokens, theirs) if "f16" in kinds else None,
        "bf16_compiled_tokens_equal_fp32": agreeing(half_tokens, ours.tokens),
    }
    for kind in kinds:
        single = medians[f"llama.cpp {kind}"]
        result[f"deltatune_lora_x_llama_{kind}"] = medians["deltatune lora"] / single
        result[f"deltatune_lora_compiled_x_llama_{kind}"] = medians["deltatune lora compiled"] / single
        result[f"sixteen_streams_x_llama_{kind}_single"] = medians["deltatune lora x16"] / single
        result[f"bf16_lora_compiled_x_llama_{kind}"] = medians["deltatune bf16 lora compiled"] / single
        result[f"bf16_sixteen_streams_x_llama_{kind}_single"] = medians["deltatune bf16 lora x16"] / single
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
