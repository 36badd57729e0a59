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
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).parent))
from common import bf16_with_adapter, one_stream_setup, race_decoders  # noqa: E402


def main() -> int:
    from deltatune.runtime import compiled
    from deltatune.runtime.compiled import CompiledDecoder

    args, _, prompt = one_stream_setup(__doc__.splitlines()[0], reps=3, with_model=False)
    model = bf16_with_adapter(args.adapter).requires_grad_(False)
    decoders = {}
    for kv in ("float32", "bfloat16"):
        with mock.patch.object(compiled, "decode_kv_dtype", compiled.decode_kv_dtype if kv == "float32" else
                               (lambda model: None)):  # fmt: skip
            decoders[kv] = CompiledDecoder(model, "tuned")
    rates, compile_s, tokens = race_decoders(decoders, prompt, args.tokens, args.reps)
    same = sum(a == b for a, b in zip(tokens["float32"], tokens["bfloat16"], strict=True))
    print(json.dumps({"tokens_per_s_by_cache_dtype": rates, "compile_s": compile_s,
                      "same_tokens": f"{same}/{args.tokens}"}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
