"""Tiny local model folders (a llama-shaped causal LM with a BPE tokenizer and chat template, a BERT-shaped
classifier) and small synthetic datasets with a learnable rule, for fast training tests on CPU."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import yaml

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
POSITIVE = ["good", "great", "lovely", "happy", "superb"]
NEGATIVE = ["bad", "awful", "sad", "terrible", "angry"]
FILLER = ["the", "day", "phone", "movie", "was", "my", "a", "today", "food", "very", "so", "it", "is"]


def sentiment_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Short texts whose label is set by one keyword among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _bpe_tokenizer(corpus: list[str], specials: list[str]):
    """Byte-level BPE trained on `corpus` (the BPE trainer is deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def _wordpiece_tokenizer(corpus: list[str], specials: list[str]):
    """WordPiece over an explicit sorted vocabulary: every corpus word, and single characters as fallback.
    (The WordPiece *trainer* breaks ties differently from run to run, which made test results vary.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers

    pre = pre_tokenizers.BertPreTokenizer()
    words = sorted({w for text in corpus for w, _ in pre.pre_tokenize_str(text.lower())})
    chars = sorted({c for w in words for c in w})
    vocab = specials + [w for w in words if w not in specials] + [f"##{c}" for c in chars]
    vocab += [c for c in chars if c not in vocab]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    return tok


def _corpus() -> list[str]:
    words = (
        POSITIVE + NEGATIVE + FILLER + ["positive", "negative", "sentiment", "user", "assistant", "system"]
    )
    return [" ".join(words), '{"sentiment": "positive"} {"sentiment": "negative"}'] * 20 + [
        r["text"] for r in sentiment_rows(200, 1)
    ]


def make_tiny_causal_lm(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = _bpe_tokenizer(_corpus(), ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.3,  # pretrained-like logit scale; at 0.02 a frozen head caps what LoRA can learn
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = _wordpiece_tokenizer(_corpus(), ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def instruction_rows(n: int, seed: int) -> list[dict[str, str]]:
    return [
        {"instruction": "Sentiment of: " + r["text"], "output": json.dumps({"sentiment": r["label"]})}
        for r in sentiment_rows(n, seed)
    ]


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def causal_config(model: Path, data: Path, out: Path, **training) -> dict:
    return {
        "model": {"path": str(model), "task": "causal_lm"},
        "data": {"train": str(data), "format": "instruction", "validation_fraction": 0.2, "max_length": 64},
        "adapter": {
            "method": "lora",
            "r": 4,
            "lora_alpha": 8,
            "target_modules": "all-linear",
            "lora_dropout": 0.0,
        },
        "optim": {"lr": 5e-3, "warmup_steps": 2},
        "training": {"max_steps": 12, "batch_size": 4, "progress": False, "log_every": 1, **training},
        "eval": {"every": 6},
        "output_dir": str(out),
    }


def classification_config(model: Path, data: dict, out: Path, **training) -> dict:
    """A LoRA classifier config on the tiny BERT that learns the keyword rule (accuracy ~0.9 after 300 steps)."""
    return {
        "model": {"path": str(model), "task": "classification"},
        "data": {"format": "classification", "max_length": 32, **data},
        "adapter": {
            "method": "lora",
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["query", "value", "dense"],
        },
        "optim": {"lr": 3e-3},
        "training": {"max_steps": 300, "batch_size": 16, "progress": False, **training},
        "eval": {"every": 50, "metric": "accuracy"},
        "output_dir": str(out),
    }


def lora_start_and_now(model_path: Path, folder: Path, targets: list[str], seeds: tuple[int, int]) -> Path:
    """Two non-identity LoRA adapters in PEFT's format, for the TRL oracle tests: `start` (where a continued
    run began: a reference) and `now`, the same adapter moved on by seeded noise (the policy)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seeds[0])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), config)
    model.save_pretrained(folder / "start")
    generator = torch.Generator().manual_seed(seeds[1])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator) * param.abs().mean())
    model.save_pretrained(folder / "now")
    return folder
