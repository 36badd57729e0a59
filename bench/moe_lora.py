"""LoRA on a mixture-of-experts model's fused experts (issue 40): a Qwen3-MoE-shaped model of ~100M parameters
(random weights, SmolLM2's tokenizer and chat template) trained on the bundled tweets with the quickstart's
task, once with LoRA on attention only and once with all-linear (attention + every expert's gate_up_proj and
down_proj), in one process, alternating which goes first. Asserted: the loss falls, and every expert's
adapter in every layer received gradient (its lora_B columns, zero at the start, are not zero at the end).
Reported: the median step and the loop per step of each, and their ratio.

    python bench/moe_lora.py [--steps 20] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from common import alternated, quickstart_step_times, step_ratio_table
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

from deltatune.models.bundled import smollm2_path

ATTENTION = "[q_proj,k_proj,v_proj,o_proj]"


def moe_model(folder: Path) -> int:
    """Save the model (and the tokenizer) to `folder`; return its parameter count."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=10, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512,
        intermediate_size=1536, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        # transformers' default 0.02 makes a random network's deeper hidden states nearly alike, and its routers
        # then send every tweet token to 2 of the 8 experts in layers 1-9 (6+ experts get no token at all);
        # at 0.1 every expert of every layer gets tokens (>= 171 per expert over 160 rows), as in a trained model
        initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def check_every_expert_trained(run: Path, experts: int, layers: int) -> None:
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    for layer in range(layers):
        for where in ("experts", "experts.base_layer"):  # down_proj, gate_up_proj (PEFT's nesting)
            b = weights[f"base_model.model.model.layers.{layer}.mlp.{where}.lora_B.weight"]
            per_expert = b.reshape(b.shape[0], -1, experts).abs().sum(dim=(0, 1))
            assert (per_expert > 0).all(), f"layer {layer} {where}: experts without gradient {per_expert}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        count = moe_model(tmp / "model")
        print(f"Qwen3-MoE shape: {count / 1e6:.1f}M parameters, 10 layers x 8 experts (top 2)")
        common = [
            f"model.path={tmp / 'model'}", "training.batch_size=8", "data.max_length=128",
            "training.checkpoint_every=null", "eval.loss_every=10", "eval.loss_samples=24",
        ]  # fmt: skip

        def variant(targets: str, name: str):
            return lambda r: quickstart_step_times(tmp / f"{name}-{r}", args.steps, [*common, targets])

        times = alternated(
            {
                "attention only": variant(f"adapter.target_modules={ATTENTION}", "attention"),
                "all-linear (+ experts)": variant("adapter.target_modules=all-linear", "experts"),
            },
            args.rounds,
        )
        for r in range(args.rounds):
            run = tmp / f"experts-{r}"
            check_every_expert_trained(run, experts=8, layers=10)
            losses = [
                json.loads(line)["loss"]
                for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line).get("split") == "validation"
            ]
            assert losses[-1] < losses[0], losses
            print(f"round {r}: validation loss {losses[0]:.3f} -> {losses[-1]:.3f}; every expert trained")
    print(step_ratio_table("adapter", times))


if __name__ == "__main__":
    main()
