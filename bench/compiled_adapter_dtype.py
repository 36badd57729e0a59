"""A float32 adapter folded into a bf16 base's compiled step against the same adapter cast to bf16 first.

Two `CompiledDecoder`s on the bundled SmolLM2-135M-Instruct loaded in bf16 (as `--dtype bfloat16` loads it),
each with the quickstart's adapter: one keeps it in float32 (what loading gives; the compiled step sums
W + s B A in float32 and rounds once), the other has it cast to bf16. One chat prompt, 64 greedy tokens,
2 threads, medians of interleaved rounds; whether the tokens are the same.

    python bench/compiled_adapter_dtype.py [--adapter outputs/quickstart/adapter] [--reps 3]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bf16_with_adapter, one_stream_setup, race_decoders  # noqa: E402


def main() -> int:
    from deltatune.runtime.compiled import CompiledDecoder

    args, _, prompt = one_stream_setup(__doc__.splitlines()[0], reps=3, with_model=False)
    decoders = {}
    for adapter_dtype in (torch.float32, torch.bfloat16):
        model = bf16_with_adapter(args.adapter)
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.to(adapter_dtype)
        name = str(adapter_dtype).removeprefix("torch.")
        decoders[name] = CompiledDecoder(model.requires_grad_(False), "tuned")
    rates, compile_s, tokens = race_decoders(decoders, prompt, args.tokens, args.reps)
    print(json.dumps({"tokens_per_s_by_adapter_dtype": rates, "compile_s": compile_s,
                      "same_tokens": tokens["float32"] == tokens["bfloat16"]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
