"""Shared pieces of the benchmarks: the SmolLM2-135M shape (random init), variants, timing helpers."""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt

QV = ["q_proj", "v_proj"]


def smollm2_shape() -> LlamaConfig:
    """The architecture of SmolLM2-135M-Instruct (134.5M parameters), without needing its weights."""
    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0,
    )  # fmt: skip


def tinyllama_shape() -> LlamaConfig:
    """The TinyLlama-1.1B architecture (1.10B parameters, untied head), without needing its weights."""
    return LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip


def base_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(smollm2_shape())
    model.requires_grad_(False)
    return model


def generation_setup(rows: int) -> tuple[LlamaForCausalLM, list[list[int]], torch.Generator]:
    """The generation benchmarks' model (SmolLM2 shape, LoRA all-linear r=16, random init, eval mode, no
    autograd) and `rows` prompts of 12-47 random tokens; the generator goes on for whatever else they draw."""
    torch.set_grad_enabled(False)
    model = base_model()
    dt.inject(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    g = torch.Generator().manual_seed(3)
    prompts = [
        torch.randint(1, 49152, (int(n),), generator=g).tolist()
        for n in torch.randint(12, 48, (rows,), generator=g)
    ]
    return model, prompts, g


LORA_SETTINGS = {
    "qv-r8": dict(r=8, lora_alpha=16, target_modules=QV),
    "all-r16": dict(r=16, lora_alpha=32, target_modules="all-linear"),
}


def make_variant(name: str, base: torch.nn.Module, in_place: bool = False) -> torch.nn.Module:
    """Variants: floor (all frozen, backward to activations only), full, dt:<setting>, peft:<setting>,
    dt-saved:<setting> (deltatune saving every adapted layer's input, as before core.rebuilt_inputs), and for
    inference dt-merged:<setting>. `in_place` adapts `base` itself (memory runs: no second copy).
    Training steps take the loss as `uses_deltatune_loss` says; floor-dt is the floor's model with deltatune's
    loss, dt-hf-loss:<setting> deltatune LoRA with transformers' loss."""
    model = base if in_place else copy.deepcopy(base)
    if name in ("floor", "floor-dt"):
        model.enable_input_require_grads()
        return model
    if name == "full":
        model.requires_grad_(True)
        return model
    library, setting = name.split(":")
    kwargs = LORA_SETTINGS[setting]
    if library.startswith("dt"):
        dt.inject(model, dt.LoraConfig(**kwargs, init_lora_weights=False))
        if library == "dt-merged":
            dt.merge(model)
        if library == "dt-saved":
            from deltatune.core.rebuilt_inputs import forget_rebuildable

            forget_rebuildable(model)
        return model
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(**kwargs, init_lora_weights=False))


def uses_deltatune_loss(name: str) -> bool:
    """Whether a variant's training step takes its loss the way deltatune's trainer does (`task_loss`: the head
    fused with the cross-entropy, task/head_loss.py) rather than as `model(**inputs).loss` (transformers' own
    loss, which PEFT with the transformers Trainer uses)."""
    return name == "floor-dt" or name.split(":")[0] in ("dt", "dt-saved")


def batch(batch_size: int = 4, length: int = 128, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49152, (batch_size, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def interleaved(
    fns: dict[str, callable], reps: int, warmup: int = 1, progress: bool = True
) -> dict[str, list[float]]:
    """Run every function `warmup` times, then `reps` rounds in rotating order; seconds per call, or the
    seconds a function returns when it times only part of its work (e.g. not the cleanup after a load).
    After each round the running medians go to stderr, so an interrupted slow run still leaves numbers."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            timed = fns[name]()
            times[name].append(timed if isinstance(timed, float) else time.perf_counter() - start)
        if progress:
            summary = ", ".join(f"{k} {statistics.median(v):.3f}s" for k, v in times.items())
            print(f"round {rep + 1}/{reps}: {summary}", file=sys.stderr, flush=True)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def status_mib(field: str) -> float:
    """A memory field of this process from /proc/self/status (VmRSS, VmHWM, ...), in MiB. Linux only."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(f"{field} is not in /proc/self/status")


QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
StepTimes = tuple[float, float]  # (median step, whole loop per step), seconds


def quickstart_step_times(folder: Path, steps: int, overrides: list[str] = ()) -> StepTimes:
    """The quickstart's config (bundled SmolLM2, bundled tweets) trained `steps` steps, every step logged, no
    generation metrics: its median step and its whole loop (evaluations, logging, checkpoints) per step."""
    from deltatune.train import load_train_config, train

    base = [
        f"training.max_steps={steps}", "training.log_every=1", "training.progress=false",
        "eval.generate_metrics=[]", "eval.metric=loss", f"output_dir={folder}",
    ]  # fmt: skip
    result = train(load_train_config(QUICKSTART, [*base, *overrides]))
    return result.seconds_per_step, result.train_seconds / result.steps


def alternated(variants: dict[str, Callable[[int], StepTimes]], rounds: int) -> dict[str, list[StepTimes]]:
    """Every variant once per round (called with the round's number), in reverse order on odd rounds."""
    times: dict[str, list[StepTimes]] = {name: [] for name in variants}
    for round_ in range(rounds):
        order = list(variants) if round_ % 2 == 0 else list(variants)[::-1]
        for name in order:
            times[name].append(variants[name](round_))
            step, loop = times[name][-1]
            print(f"round {round_} {name}: {step:.3f} s/step (median), {loop:.3f} s/step (loop)",
                  file=sys.stderr, flush=True)  # fmt: skip
    return times


def step_ratio_table(first_column: str, times: dict[str, list[StepTimes]]) -> str:
    """Medians over the rounds, and their ratios to the first variant's."""
    baseline = next(iter(times))
    base_step = statistics.median(t[0] for t in times[baseline])
    base_loop = statistics.median(t[1] for t in times[baseline])
    lines = [
        f"| {first_column} | median step (s) | loop per step (s) | step / {baseline} | loop / {baseline} |",
        "|---|---|---|---|---|",
    ]
    for name, runs in times.items():
        step, loop = statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs)
        lines.append(
            f"| {name} | {step:.4f} | {loop:.4f} | {step / base_step:.3f} | {loop / base_loop:.3f} |"
        )
    return "\n".join(lines)


def start_studio(root: Path, port: int) -> subprocess.Popen:
    """`deltatune studio` over `root`, once it answers."""
    import httpx

    process = subprocess.Popen(
        [sys.executable, "-m", "deltatune", "studio", "--runs", str(root), "--port", str(port)]
    )
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=60).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)


def one_stream_setup(
    description: str, reps: int, with_model: bool = True
) -> tuple[argparse.Namespace, torch.nn.Module | None, list[int]]:
    """The single-stream decode benchmarks' common start: their flags (--adapter, --tokens, --reps,
    --threads), the bundled SmolLM2-135M-Instruct in fp32 with the adapter loaded as "tuned" (None without
    `with_model`), and one chat prompt's ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.models.bundled import smollm2_path

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--adapter", type=Path, default=Path("outputs/quickstart/adapter"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = None
    if with_model:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        dt.load_adapter(model, args.adapter, adapter_name="tuned")
    messages = [{"role": "user", "content": "Tell me about this tweet: my flight got cancelled again"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    return args, model, prompt


def compiled_decode(decoder, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    """A `CompiledDecoder`'s seconds per token from its first new token to its last (the prefill apart), and
    its `tokens` greedy tokens (no end-of-sequence)."""
    marks: list[float] = []
    done = decoder.generate(
        prompt, max_new_tokens=tokens, eos_token_id=None, on_token=lambda _: marks.append(time.perf_counter())
    )
    return (marks[-1] - marks[0]) / (tokens - 1), done.tokens


def race_decoders(
    decoders: dict, prompt: list[int], tokens: int, reps: int
) -> tuple[dict[str, float], dict[str, int], dict[str, list[int]]]:
    """`CompiledDecoder`s side by side: each compiled first (8 tokens, timed), then `reps` interleaved rounds
    of `tokens` greedy tokens. Returns each one's median tokens/s, first-compile seconds and tokens."""
    compile_s = {}
    for name, decoder in decoders.items():
        started = time.perf_counter()
        compiled_decode(decoder, prompt, 8)
        compile_s[name] = round(time.perf_counter() - started)
    rates: dict[str, list[float]] = {name: [] for name in decoders}
    made = {}
    for round_ in range(reps):
        for name in decoders if round_ % 2 == 0 else list(decoders)[::-1]:
            seconds, made[name] = compiled_decode(decoders[name], prompt, tokens)
            rates[name].append(1 / seconds)
    return {name: round(median(r), 1) for name, r in rates.items()}, compile_s, made


def bf16_with_adapter(adapter: Path) -> torch.nn.Module:
    """The bundled SmolLM2-135M-Instruct loaded in bf16, as `--dtype bfloat16` loads it, with `adapter` as
    "tuned" (kept in float32, as loading keeps it on a half base), in eval mode."""
    from transformers import AutoModelForCausalLM

    from deltatune.models.bundled import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.bfloat16).eval()
    with warnings.catch_warnings():  # (that the adapter was saved on an fp32 base: known here)
        warnings.simplefilter("ignore")
        dt.load_adapter(model, adapter, adapter_name="tuned")
    return model


def engine_rate(model, prompts: list[list[int]], adapter: str | None, tokens: int) -> float:
    """New tokens per second over all rows of the eager engine (`DecodeBatch`), from the first token to the last."""
    from deltatune.runtime.decode import DecodeBatch

    batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None, capacity=len(prompts))
    batch.add(prompts, [adapter] * len(prompts), max_new_tokens=[tokens] * len(prompts))
    started = time.perf_counter()
    steps = 0
    while len(batch):
        batch.step()
        steps += 1
    return steps * len(prompts) / (time.perf_counter() - started)
