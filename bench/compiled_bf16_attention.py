"""The compiled single-row step on a bf16 base: its static cache and attention in float32 against bf16.

Two `CompiledDecoder`s on one model, the bundled SmolLM2-135M-Instruct loaded in bf16 (as `--dtype bfloat16`
loads it) with the quickstart's float32 adapter: one as built (a float32 static cache, the prompt and steps
attending in float32: `runtime.decode_attention`), one with the cache in bf16 and torch's bf16 attention kernel
(what it did before). One chat prompt, `--tokens` greedy tokens, 2 threads, medians of interleaved rounds;
whether the tokens are the same.

    python bench/compiled_bf16_attention.py [--adapter outputs/quickstart/adapter] [--tokens 64] [--reps 3]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).parent))
from common import bf16_with_adapter, compiled_decode, one_stream_setup  # noqa: E402


def main() -> int:
    from deltatune.runtime import compiled
    from deltatune.runtime.compiled import CompiledDecoder

    args, _, prompt = one_stream_setup(__doc__.splitlines()[0], reps=3)
    model = bf16_with_adapter(args.adapter).requires_grad_(False)
    decoders, compile_s = {}, {}
    for kv in ("float32", "bfloat16"):
        with mock.patch.object(compiled, "decode_kv_dtype", compiled.decode_kv_dtype if kv == "float32" else
                               (lambda model: None)):  # fmt: skip
            decoders[kv] = CompiledDecoder(model, "tuned")
        started = time.perf_counter()
        compiled_decode(decoders[kv], prompt, 8)
        compile_s[kv] = round(time.perf_counter() - started)
    rates: dict[str, list[float]] = {kv: [] for kv in decoders}
    tokens = {}
    for round_ in range(args.reps):
        for kv in decoders if round_ % 2 == 0 else list(decoders)[::-1]:
            seconds, tokens[kv] = compiled_decode(decoders[kv], prompt, args.tokens)
            rates[kv].append(1 / seconds)
    result = {
        "tokens_per_s_by_cache_dtype": {kv: round(statistics.median(r), 1) for kv, r in rates.items()},
        "compile_s": compile_s,
        "same_tokens": f"{sum(a == b for a, b in zip(tokens['float32'], tokens['bfloat16'], strict=True))}"
        f"/{args.tokens}",
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
