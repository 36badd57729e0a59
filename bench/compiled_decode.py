"""The compiled decode step (`runtime.compiled`) against the eager engine, one stream, base and adapter.

The bundled SmolLM2-135M-Instruct (real weights, fp32) with an adapter (default: the quickstart's, all-linear
r=16), 64 greedy tokens of one chat prompt, the rate from the first new token to the last. Side by side in one
process, rounds interleaved: the eager engine (`DecodeBatch`, what the server, `generate` and evaluation run)
and `CompiledDecoder` (static KV cache, inductor freezing + max-autotune), each on the base and with the
adapter. Also: the seconds each compiled variant's first request spent compiling, the process's resident
memory before and after, whether the greedy tokens are the eager engine's, and the fp32 weight-streaming bound
(bytes of weights / the rate one copy of that many bytes runs at here).

    python bench/compiled_decode.py [--adapter outputs/quickstart/adapter] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import compiled_decode, interleaved, one_stream_setup, status_mib  # noqa: E402


def streaming_bound(weight_bytes: int) -> dict[str, float]:
    """Tokens/s if each token read the weights once at the rate a copy of that many bytes runs at."""
    source = torch.empty(weight_bytes // 4)
    target = torch.empty_like(source)
    source.fill_(1.0)
    target.copy_(source)
    best = min(_timed(lambda: target.copy_(source)) for _ in range(5))
    rate = 2 * weight_bytes / best  # bytes read + written
    return {"copy_gb_per_s": round(rate / 1e9, 1), "tokens_per_s": round(rate / weight_bytes, 1)}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    from deltatune.runtime.compiled import CompiledDecoder
    from deltatune.runtime.decode import DecodeBatch

    args, model, prompt = one_stream_setup(__doc__.splitlines()[0], reps=3)

    def eager(adapter):
        batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None, capacity=1)
        (first,) = batch.add([prompt], [adapter], max_new_tokens=[args.tokens])
        tokens = [first.token]
        started = time.perf_counter()
        while len(batch):
            tokens += [s.token for s in batch.step() if s.token is not None]
        return (time.perf_counter() - started) / (args.tokens - 1), tokens

    def compiled(decoder):
        return compiled_decode(decoder, prompt, args.tokens)

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_before = status_mib("VmRSS")
    decoders, compile_s = {}, {}
    for name, adapter in (("base", None), ("lora", "tuned")):
        decoders[name] = CompiledDecoder(model, adapter)
        started = time.perf_counter()
        compiled(decoders[name])
        compile_s[name] = round(time.perf_counter() - started, 1)
    rss_after = status_mib("VmRSS")
    tokens = {}

    def run(kind, name):
        seconds, tokens[f"{kind}-{name}"] = (
            eager(None if name == "base" else "tuned") if kind == "eager" else compiled(decoders[name])
        )
        return seconds

    variants = {
        f"{kind}-{name}": (lambda k=kind, n=name: run(k, n))
        for kind in ("eager", "compiled")
        for name in ("base", "lora")
    }
    times = interleaved(variants, args.reps)
    per_s = {k: 1 / statistics.median(v) for k, v in times.items()}
    bound = streaming_bound(weights)
    result = {
        "tokens_per_s": {k: round(v, 1) for k, v in per_s.items()},
        "compiled_x_eager": {
            n: round(per_s[f"compiled-{n}"] / per_s[f"eager-{n}"], 2) for n in ("base", "lora")
        },
        "lora_x_base_time_per_token": {
            k: round(per_s[f"{k}-base"] / per_s[f"{k}-lora"], 3) for k in ("eager", "compiled")
        },
        "same_greedy_tokens": {
            n: sum(a == b for a, b in zip(tokens[f"eager-{n}"], tokens[f"compiled-{n}"], strict=True))
            for n in ("base", "lora")
        },
        "first_request_compile_s": compile_s,
        "rss_mib": {"before_compiling": round(rss_before), "after": round(rss_after)},
        "weights_mb": round(weights / 1e6),
        "streaming_bound": bound,
        "x_streaming_bound": {k: round(v / bound["tokens_per_s"], 2) for k, v in per_s.items()},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
