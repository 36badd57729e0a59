"""A float32 adapter folded into a bf16 base's compiled step against the same adapter cast to bf16 first.

Two `CompiledDecoder`s on the bundled SmolLM2-135M-Instruct loaded in bf16 (as `--dtype bfloat16` loads it),
each with the quickstart's adapter: one keeps it in float32 (what loading gives; the compiled step sums
W + s B A in float32 and rounds once), the other has it cast to bf16. One chat prompt, 64 greedy tokens,
2 threads, medians of interleaved rounds; whether the tokens are the same.

    python bench/compiled_adapter_dtype.py [--adapter outputs/quickstart/adapter] [--reps 3]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bf16_with_adapter, compiled_decode, one_stream_setup  # noqa: E402


def main() -> int:
    from deltatune.runtime.compiled import CompiledDecoder

    args, _, prompt = one_stream_setup(__doc__.splitlines()[0], reps=3)
    decoders, compile_s = {}, {}
    for adapter_dtype in (torch.float32, torch.bfloat16):
        model = bf16_with_adapter(args.adapter)
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.to(adapter_dtype)
        name = str(adapter_dtype).removeprefix("torch.")
        decoders[name] = CompiledDecoder(model.requires_grad_(False), "tuned")
        started = time.perf_counter()
        compiled_decode(decoders[name], prompt, 8)
        compile_s[name] = round(time.perf_counter() - started)
    rates: dict[str, list[float]] = {name: [] for name in decoders}
    tokens = {}
    for _ in range(args.reps):
        for name, decoder in decoders.items():
            seconds, tokens[name] = compiled_decode(decoder, prompt, args.tokens)
            rates[name].append(1 / seconds)
    result = {
        "tokens_per_s_by_adapter_dtype": {name: round(statistics.median(r), 1) for name, r in rates.items()},
        "compile_s": compile_s,
        "same_tokens": tokens["float32"] == tokens["bfloat16"],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
