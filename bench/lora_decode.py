"""What an unmerged LoRA adapter adds to each decoded token, one stream, and where it goes.

The bundled SmolLM2-135M-Instruct (real weights) with an adapter (default: the quickstart's, all-linear r=16),
64 greedy tokens of one chat prompt through `DecodeBatch`, the rate from the first new token to the last.
Side by side in one process, rounds interleaved:
- `base`: the adapter off;
- `lora`: the adapter on, as the engine runs it (the lean inference path, `LoraLinear._inference_forward`);
- `lora-b-copy`: the lean path with B^T kept as its own contiguous tensor (made once per layer);
- `lora-general-path`: the adapter through the general low-rank path (what every call took before);
- `lora-a-only`: the base plus each layer's A x, no B product: what the A side alone costs;
- `lora-wrapped`: the wrapper's own forward returning its base layer's output: the Python around it.
Then a torch.profiler table of 40 decode steps, base and adapter, for the operators' self times.

    python bench/lora_decode.py [--adapter outputs/quickstart/adapter] [--reps 5] [--threads 2]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, one_stream_setup  # noqa: E402


def main() -> int:
    from deltatune.methods.lora import layers
    from deltatune.runtime.decode import DecodeBatch

    args, model, prompt = one_stream_setup(__doc__.splitlines()[0], reps=5)

    copies: dict[int, torch.Tensor] = {}

    def b_copy(self, x, name):
        b = self.lora_B[name].weight
        b_t = copies.get(id(b))
        if b_t is None:
            b_t = copies[id(b)] = b.t().contiguous()
        out = torch.nn.functional.linear(x, self.base_layer.weight, self.base_layer.bias)
        h = torch.nn.functional.linear(x, self.lora_A[name].weight)
        out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b_t, alpha=self.scaling[name])
        return out

    def a_only(self, x, *rest, **kwargs):
        out = self.base_layer(x)
        if self.unmerged_active:
            self.lowrank(x, self.unmerged_active[0])
        return out

    def wrapped(self, x, *rest, **kwargs):
        return self.base_layer(x)

    variants = {
        "base": (None, {}),
        "lora": ("tuned", {}),
        "lora-general-path": ("tuned", {"_lean": lambda *_: False}),
        "lora-b-copy": ("tuned", {"_inference_forward": b_copy}),
        "lora-a-only": ("tuned", {"forward": a_only}),
        "lora-wrapped": ("tuned", {"forward": wrapped}),
    }

    def seconds_per_token(adapter, patches) -> float:
        as_built = {name: getattr(layers.LoraLinear, name) for name in patches}
        for name, value in patches.items():
            setattr(layers.LoraLinear, name, value)
        try:
            batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None, capacity=1)
            batch.add([prompt], [adapter], max_new_tokens=[args.tokens])
            batch.step()  # the prompt's prefill and first token
            started = time.perf_counter()
            for _ in range(args.tokens - 1):
                batch.step()
            return (time.perf_counter() - started) / (args.tokens - 1)
        finally:
            for name, value in as_built.items():
                setattr(layers.LoraLinear, name, value)

    times = interleaved({k: (lambda v=v: seconds_per_token(*v)) for k, v in variants.items()}, args.reps)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    result = {
        "ms_per_token": {k: round(v, 2) for k, v in ms.items()},
        "x_base": {k: round(v / ms["base"], 3) for k, v in ms.items()},
    }
    print(json.dumps(result, indent=2))
    for adapter in (None, "tuned"):
        batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None, capacity=1)
        batch.add([prompt], [adapter], max_new_tokens=[50])
        for _ in range(5):
            batch.step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            for _ in range(40):
                batch.step()
        print(f"\n40 decode steps, adapter {adapter}:")
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    return 0


if __name__ == "__main__":
    sys.exit(main())
