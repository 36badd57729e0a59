"""The quickstart (`make demo`): LoRA-tune the bundled SmolLM2-135M-Instruct to answer tweets' sentiment as a
strict JSON object, on the bundled tweet data, fully offline, in about 4.5 minutes on 2 CPU cores.

It scores the base model on 300 held-out tweets (share of answers that are valid JSON of the required shape,
and accuracy), trains with examples/quickstart.yaml through the same code as `deltatune train`, scores the
adapter on the same tweets, and prints sizes, time, memory and where everything is.
Extra arguments are config overrides, e.g. `python examples/quickstart.py training.max_steps=20`.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from deltatune.models import smollm2_path
from deltatune.train import evaluate_adapter, load_train_config, train
from deltatune.train.reporting import peak_rss_mib

CONFIG = Path(__file__).with_name("quickstart.yaml")


def main(overrides: list[str]) -> None:
    start = time.perf_counter()
    cfg = load_train_config(CONFIG, overrides)
    if Path(cfg.output_dir).exists():  # the demo's own folder: a re-run starts over instead of refusing
        print(f"removing the previous demo run in {cfg.output_dir}")
        shutil.rmtree(cfg.output_dir)
    base = smollm2_path()
    print(f"base model ready in {time.perf_counter() - start:.0f}s: {base}")

    print(f"\n[1/3] base model on {cfg.eval.generate_samples} held-out tweets (generating)...", flush=True)
    before = evaluate_adapter(cfg, None, loss=False)
    print(f"  sample answers: {before['sample_answers']}")

    print(
        f"\n[2/3] LoRA training, {cfg.training.max_steps} steps of {cfg.training.batch_size} tweets...",
        flush=True,
    )
    tick = time.perf_counter()
    result = train(cfg)
    train_seconds = time.perf_counter() - tick

    print("\n[3/3] adapter on the same held-out tweets: evaluated at the end of training")
    after = result.validation
    adapter_bytes = (result.saved_to / "adapter_model.safetensors").stat().st_size
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    rows = [
        ("valid JSON answers", before["json_valid"], after["json_valid"]),
        ("accuracy", before["json_match"], after["json_match"]),
    ]
    print(f"\n{'held-out tweets (n=' + str(before['generated']) + ')':<28}{'base':>8}{'+ LoRA':>9}")
    for name, b, a in rows:
        print(f"{name:<28}{b:>8.1%}{a:>9.1%}")
    print(f"\n{result.trainable}")
    print(
        f"adapter on disk: {adapter_bytes / 2**20:.2f} MiB = {100 * adapter_bytes / base_bytes:.2f}% of the "
        f"{base_bytes / 2**20:.0f} MiB base model"
    )
    print(
        f"training: {train_seconds:.0f}s (median {result.seconds_per_step:.2f} s/step); whole demo "
        f"{time.perf_counter() - start:.0f}s; peak memory (RSS) {peak_rss_mib():.0f} MiB"
    )
    out = result.output_dir
    print(f"\nadapter:  {result.saved_to}\nmetrics:  {out / 'metrics.jsonl'}\nplot:     {out / 'curves.png'}")
    print(
        "chat with it (type tweets, one per line):\n  .venv/bin/deltatune generate --config "
        f"{CONFIG.relative_to(Path.cwd()) if CONFIG.is_relative_to(Path.cwd()) else CONFIG} --adapter {result.saved_to}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
