"""LoRA vs full fine-tuning of the bundled MiniLM on the bundled tweets, through the same `deltatune train`
loop with the same data, steps, batch size and seed (examples/sentiment_minilm.yaml). Each run is a fresh
process, so peak memory (RSS) is per method. Prints a markdown table for examples/README.md.

Full fine-tuning gets its own learning rate (the usual ~1e-5..5e-5 for all BERT weights; LoRA's 1e-3 would
wreck the pretrained weights), and nothing else differs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

CONFIG = Path(__file__).with_name("sentiment_minilm.yaml")
FULL_LR = 5e-5


def run(method: str, raw: dict, root: Path) -> dict:
    raw = json.loads(json.dumps(raw))
    if method == "full":
        raw["adapter"] = {"method": "full"}
        raw["optim"]["lr"] = FULL_LR
    raw["output_dir"] = str(root / method)
    shutil.rmtree(raw["output_dir"], ignore_errors=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(raw, handle)
    subprocess.run([sys.executable, "-m", "deltatune", "train", handle.name], check=True)
    return json.loads((root / method / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("outputs/compare-minilm"))
    args = parser.parse_args()
    raw = yaml.safe_load(CONFIG.read_text())
    results = {method: run(method, raw, args.out) for method in ("lora", "full")}
    print(
        "\n| method | accuracy | macro F1 | trainable params | trainable % | s/step | peak RSS MiB | best step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method, r in results.items():
        v = r["validation"]
        print(
            f"| {method} | {v['accuracy']:.3f} | {v['f1']:.3f} | {r['trainable_params']:,} | "
            f"{r['trainable_percent']:.2f}% | {r['seconds_per_step']:.3f} | {r['peak_rss_mib']:.0f} | {r['best_step']} |"
        )
    ratio = results["lora"]["validation"]["accuracy"] / results["full"]["validation"]["accuracy"]
    print(f"\nLoRA reaches {ratio:.1%} of full fine-tuning's accuracy.")


if __name__ == "__main__":
    main()
