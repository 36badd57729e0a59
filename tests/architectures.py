"""The architecture matrix: tiny random models of many transformers architectures, each taken through what a
user does with an adapter, with what happened at each stage.

Stages: inject (LoRA all-linear) -> train (a few steps: every adapter factor gets gradient, the loss falls) ->
save and load in PEFT (same outputs) -> PEFT's own all-linear adapter loaded here (same outputs) -> merge (same
outputs) -> for causal LMs, the decode engine's tokens equal transformers' `generate` (or the engine declines,
with its reason, and the server falls back to `generate`).

`python tests/architectures.py` prints the table the README shows.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltatune as dt

V = 96  # vocabulary of every text model
TEXT = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
MOE = {**TEXT, "num_experts_per_tok": 2}


@dataclass(frozen=True)
class Arch:
    name: str
    kind: str  # causal | moe | seq2seq | encoder | vision
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]


def _causal(model_type: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        settings = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **config}
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings)).eval()

    return build


def _base(model_type: str, auto: str = "AutoModel", **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        return (
            getattr(transformers, auto)
            .from_config(transformers.AutoConfig.for_model(model_type, **config))
            .eval()
        )

    return build


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": (torch.arange(16).reshape(2, 8) * 7 + 3) % V}


def _seq2seq() -> dict[str, torch.Tensor]:
    return {**_ids(), "decoder_input_ids": (torch.arange(10).reshape(2, 5) * 5 + 4) % V}


def _image() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}


def _audio() -> dict[str, torch.Tensor]:
    features = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    return {"input_features": features, "decoder_input_ids": (torch.arange(8).reshape(2, 4) + 3) % V}


VISION = {"image_size": 16, "patch_size": 4, "num_channels": 3, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4}  # fmt: skip
SEQ2SEQ = {"vocab_size": V, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
           "decoder_attention_heads": 4, "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "max_position_embeddings": 32,
           "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2}  # fmt: skip

ARCHITECTURES = [
    Arch("llama", "causal", _causal("llama", **TEXT), _ids),
    Arch("mistral", "causal", _causal("mistral", **TEXT, head_dim=8, sliding_window=4), _ids),
    Arch("qwen2", "causal", _causal("qwen2", **TEXT), _ids),
    Arch("qwen3", "causal", _causal("qwen3", **TEXT, head_dim=8), _ids),
    Arch("gemma", "causal", _causal("gemma", **TEXT, head_dim=8), _ids),
    Arch("gemma2", "causal", _causal("gemma2", **TEXT, head_dim=8, sliding_window=4), _ids),
    Arch("gemma3_text", "causal", _causal("gemma3_text", **TEXT, head_dim=8, sliding_window=4), _ids),
    Arch("phi", "causal", _causal("phi", **TEXT), _ids),
    Arch("phi3", "causal", _causal("phi3", **TEXT), _ids),
    Arch("gpt2", "causal", _causal("gpt2", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32), _ids),
    Arch("gpt_neox", "causal", _causal("gpt_neox", **{k: v for k, v in TEXT.items() if "key_value" not in k}), _ids),
    Arch("gptj", "causal", _causal("gptj", vocab_size=V, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=32),
         _ids),
    Arch("falcon", "causal", _causal("falcon", vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4), _ids),
    Arch("opt", "causal", _causal("opt", vocab_size=V, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                  num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=32), _ids),
    Arch("bloom", "causal", _causal("bloom", vocab_size=V, hidden_size=32, n_layer=2, n_head=4), _ids),
    Arch("starcoder2", "causal", _causal("starcoder2", **TEXT), _ids),
    Arch("olmo2", "causal", _causal("olmo2", **TEXT), _ids),
    Arch("granite", "causal", _causal("granite", **TEXT), _ids),
    Arch("cohere", "causal", _causal("cohere", **TEXT), _ids),
    Arch("stablelm", "causal", _causal("stablelm", **TEXT), _ids),
    Arch("qwen3_moe", "moe", _causal("qwen3_moe", **MOE, moe_intermediate_size=16, num_experts=4, head_dim=8), _ids),
    Arch("qwen2_moe", "moe", _causal("qwen2_moe", **MOE, moe_intermediate_size=16, num_experts=4,
                                     shared_expert_intermediate_size=16), _ids),
    Arch("mixtral", "moe", _causal("mixtral", **MOE, num_local_experts=4, head_dim=8), _ids),
    Arch("olmoe", "moe", _causal("olmoe", **MOE, num_experts=4), _ids),
    Arch("t5", "seq2seq", _base("t5", "AutoModelForSeq2SeqLM", vocab_size=V, d_model=32, d_ff=48, d_kv=8,
                                num_layers=2, num_heads=4, decoder_start_token_id=0), _seq2seq),
    Arch("bart", "seq2seq", _base("bart", "AutoModelForSeq2SeqLM", **SEQ2SEQ), _seq2seq),
    Arch("mbart", "seq2seq", _base("mbart", "AutoModelForSeq2SeqLM", **SEQ2SEQ), _seq2seq),
    Arch("whisper", "seq2seq", _base("whisper", "AutoModelForSpeechSeq2Seq", **SEQ2SEQ, num_mel_bins=8,
                                     max_source_positions=8, max_target_positions=32), _audio),
    Arch("bert", "encoder", _base("bert", **{k: v for k, v in TEXT.items() if "key_value" not in k}), _ids),
    Arch("roberta", "encoder", _base("roberta", **{k: v for k, v in TEXT.items() if "key_value" not in k},
                                     pad_token_id=1), _ids),
    Arch("deberta_v2", "encoder", _base("deberta-v2", **{k: v for k, v in TEXT.items() if "key_value" not in k}),
         _ids),
    Arch("distilbert", "encoder", _base("distilbert", vocab_size=V, dim=32, hidden_dim=48, n_layers=2, n_heads=4),
         _ids),
    Arch("electra", "encoder", _base("electra", **{k: v for k, v in TEXT.items() if "key_value" not in k},
                                     embedding_size=32), _ids),
    Arch("vit", "vision", _base("vit", **VISION), _image),
    Arch("swin", "vision", _base("swin", image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[1, 1],
                                 num_heads=[2, 2], window_size=2), _image),
    Arch("convnext", "vision", _base("convnext", num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                     image_size=16, layer_scale_init_value=1.0), _image),
    Arch("clip_vision", "vision", _base("clip_vision_model", **VISION), _image),
    Arch("siglip_vision", "vision", _base("siglip_vision_model", **VISION), _image),
]  # fmt: skip


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    if hasattr(value, "to_tuple"):
        return _tensors(value.to_tuple())
    return []


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every floating tensor the model returns (logits, hidden states, a pooled output)."""
    with torch.no_grad():
        return _tensors(model(**inputs, **({"use_cache": False} if "input_ids" in inputs else {})))


def _same(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 1e-4) -> str:
    if len(a) != len(b):
        return f"{len(a)} outputs vs {len(b)}"
    worst = max(float((x - y).abs().max() / (y.abs().max() + 1)) for x, y in zip(a, b, strict=True))
    return "ok" if worst < tol else f"outputs differ by {worst:.2g}"


def _train(arch: Arch) -> str:
    model = arch.build()  # eval mode: no dropout, so the loss measures the adapter alone
    dt.inject(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    inputs = arch.inputs()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    torch.manual_seed(1)
    targets = [torch.randn_like(t) for t in outputs(arch.build(), inputs)]  # outputs to move towards
    losses = []
    for step in range(4):
        produced = _tensors(model(**inputs))
        loss = sum((t.float() - target).pow(2).mean() for t, target in zip(produced, targets, strict=True))
        loss.backward()
        if step == 0:
            silent = [n for n, p in model.named_parameters() if "lora_B" in n and not p.grad.abs().sum() > 0]
            if silent:
                return f"no gradient reaches {len(silent)} factor(s), e.g. {silent[0]}"
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return "ok" if losses[-1] < losses[0] else f"loss did not fall: {losses}"


def _engine(model: nn.Module, inputs: dict[str, torch.Tensor]) -> str:
    from deltatune.runtime import generate
    from deltatune.runtime.decode import ContinuousBatchingUnsupported, DecodeBatch

    prompts = [row[: 5 + i].tolist() for i, row in enumerate(inputs["input_ids"])]
    expected = generate(model, prompts, ["default"] * 2, max_new_tokens=5, pad_token_id=0, eos_token_id=None,
                        continuous=False)  # fmt: skip
    try:
        batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None)
        steps = batch.add(prompts, ["default"] * 2, max_new_tokens=[5, 5])
    except ContinuousBatchingUnsupported as exc:
        return f"declined: {exc}"
    tokens: dict[int, list[int]] = {s.row: [] for s in steps}
    while steps:
        for s in steps:
            if s.token is not None:
                tokens[s.row].append(s.token)
        steps = batch.step()
    got = [tokens[handle] for handle in sorted(tokens)]
    return (
        "ok"
        if got == [e.tokens for e in expected]
        else f"tokens differ: {got} vs {[e.tokens for e in expected]}"
    )


def run(arch: Arch) -> dict[str, str]:
    """Each stage's outcome: "ok", or what went wrong (the first failure ends the row)."""
    import peft

    result: dict[str, str] = {}
    inputs = arch.inputs()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stages = []

        def inject() -> str:
            model = arch.build()
            torch.manual_seed(1)
            dt.inject(
                model, dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
            )
            ours = outputs(model, inputs)
            dt.save_adapter(model, tmp / "ours")
            stages.append(ours)
            base = outputs(arch.build(), inputs)
            changed = any(not torch.equal(x, y) for x, y in zip(ours, base, strict=True))
            return "ok" if changed else "the adapter changes nothing"

        def to_peft() -> str:
            theirs = peft.PeftModel.from_pretrained(arch.build(), tmp / "ours").eval()
            return _same(outputs(theirs, inputs), stages[0])

        def from_peft() -> str:
            torch.manual_seed(2)
            config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
            theirs = peft.get_peft_model(arch.build(), config).eval()
            expected = outputs(theirs, inputs)
            theirs.save_pretrained(tmp / "theirs")
            model = arch.build()
            dt.load_adapter(model, tmp / "theirs")
            stages.append((model, expected))
            return _same(outputs(model, inputs), expected)

        def merge() -> str:
            model, expected = stages[1]
            dt.merge(model)
            return _same(outputs(model, inputs), expected, tol=1e-3)

        def engine() -> str:
            model = arch.build()
            if (
                arch.kind == "moe"
            ):  # an expert adapter runs apart from mixed batches: the engine gets attention's
                dt.inject(
                    model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                )
                outcome = _engine(model, inputs)
                return "ok (attention LoRA; expert LoRA runs apart)" if outcome == "ok" else outcome
            dt.load_adapter(model, tmp / "ours")
            return _engine(model, inputs)

        plan = [("inject", inject), ("train", lambda: _train(arch)), ("peft reads ours", to_peft),
                ("we read peft's", from_peft), ("merge", merge)]  # fmt: skip
        if arch.kind in ("causal", "moe"):
            plan.append(("engine = generate", engine))
        for stage, step in plan:
            try:
                result[stage] = step()
            except Exception as exc:  # recorded: the matrix says what fails, and why
                result[stage] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            if not result[stage].startswith(("ok", "declined")):
                break
    return result


def short(outcome: str, limit: int = 110) -> str:
    """An outcome for a table cell: its first clause, at most `limit` characters."""
    text = outcome.split("; ")[0].replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def table(results: dict[str, dict[str, str]]) -> str:
    stages = ["inject", "train", "peft reads ours", "we read peft's", "merge", "engine = generate"]
    kinds = {a.name: a.kind for a in ARCHITECTURES}
    lines = ["| architecture | kind | " + " | ".join(stages) + " |", "|---" * (len(stages) + 2) + "|"]
    for name, outcome in results.items():
        cells = []
        for stage in stages:
            value = outcome.get(stage, "n/a" if stage == "engine = generate" else "not reached")
            cells.append("yes" + value[2:] if value.startswith("ok") else short(value))
        lines.append(f"| {name} | {kinds[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table({arch.name: run(arch) for arch in ARCHITECTURES}))
