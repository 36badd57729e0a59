"""The code paths issue 43's refactor moved, timed against an older checkout of deltatune side by side.

    python bench/refactor_paths.py --old 7f412dc --rounds 5

Each round runs this file's `measure` once under the old source (a `git worktree` of `--old`) and once under
this checkout, alternating which goes first, in fresh processes on the same machine; the table is the
median over rounds and the new / old ratio. The paths: encoding 2,000 chat and instruction rows (the prompt
renderer), building 2,000 LoRA configs (the pydantic type checks), saving and loading an adapter (the typed
deltatune.json) and one greedy `generate` call of 16 rows x 16 tokens on the tiny random Llama (`Sampling`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _data_spec(**fields):
    try:
        from deltatune.data.spec import DataSpec
    except ImportError:  # before the task layer
        from deltatune.train.config import DataSpec
    return DataSpec(**fields)


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def measure() -> dict[str, float]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import deltatune as dt
    from deltatune.data.formats import Encoder
    from deltatune.models import smollm2_path
    from deltatune.runtime import generate

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    chat = Encoder(tokenizer, _data_spec(train="x", format="chat", system_prompt="Be brief."))
    instruction = Encoder(tokenizer, _data_spec(train="x", format="instruction"))
    rows = [f"Row {i}: is the movie good? It was a long evening, {i % 7} stars." for i in range(1000)]

    def encode() -> None:
        for text in rows:
            chat.encode(
                {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "yes"}]}
            )
            instruction.encode({"instruction": text, "output": "positive"})

    def configs() -> None:
        for i in range(2000):
            dt.LoraConfig(r=8 + i % 4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    dt.inject(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    folder = Path(tempfile.mkdtemp())

    def save_load() -> None:
        saved = dt.save_adapter(model, folder / f"a{time.perf_counter_ns()}")
        torch.manual_seed(0)
        dt.load_adapter(LlamaForCausalLM(config).eval(), saved)  # the same base: every check runs

    prompts = [[(7 * i + j) % 90 + 3 for j in range(12)] for i in range(16)]

    def decode() -> None:
        with torch.no_grad():
            generate(model, prompts, ["default"] * 16, max_new_tokens=16, pad_token_id=0, eos_token_id=None)

    return {
        "encode 2,000 rows": _timed(encode, 5),
        "2,000 LoRA configs": _timed(configs),
        "save + load an adapter": _timed(save_load, 5),
        "generate 16 x 16": _timed(decode, 5),
    }


def _run(source: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(source / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, __file__, "--measure"], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", default="7f412dc", help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure()))
        return
    old = Path(tempfile.mkdtemp()) / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.old], check=True,
                   capture_output=True)  # fmt: skip
    try:
        runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        for i in range(args.rounds):
            for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
                runs[name].append(_run(old if name == "old" else ROOT))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    print(f"| path | {args.old} (s) | now (s) | now / {args.old} |\n|---|---|---|---|")
    for path in runs["new"][0]:
        before = statistics.median(r[path] for r in runs["old"])
        after = statistics.median(r[path] for r in runs["new"])
        print(f"| {path} | {before:.4f} | {after:.4f} | {after / before:.3f} |")


if __name__ == "__main__":
    main()
