"""What an export costs in memory: `export_merged` on a LoRA model, merging on a copy that shares the tensors the
merge leaves alone, against the full deep copy it made before (core/export.py, `_copy_sharing_unchanged`).

Each (setting, copy) pair runs in a fresh process: the model is built (random init) and adapted, the peak
resident set is reset (/proc/self/clear_refs), and `export_merged` writes the merged folder and measures its
logit error on a sample. Reported: the peak resident set the export added above the adapted model, and the
written folder checked to be identical between the two ways of copying.

    python bench/export_memory.py --shape smollm2 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import LORA_SETTINGS, smollm2_shape, status_mib, tinyllama_shape  # noqa: E402

SHAPES = {"smollm2": smollm2_shape, "tinyllama": tinyllama_shape}


def run_one(shape: str, setting: str, how: str) -> None:
    """In this process: build, adapt, export once; print one JSON line."""
    from transformers import LlamaForCausalLM

    import deltatune as dt
    import deltatune.core.export as export

    if how == "deepcopy":  # the copy as it was before: every tensor duplicated
        export._copy_sharing_unchanged = copy.deepcopy
    torch.manual_seed(0)
    model = LlamaForCausalLM(SHAPES[shape]())
    dt.inject(model, dt.LoraConfig(**LORA_SETTINGS[setting], init_lora_weights=False))
    sample = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current resident set
    before = status_mib("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        report = dt.export_merged(model, Path(tmp) / "merged", sample=sample)
        peak = status_mib("VmHWM")
        digest = hashlib.sha256((Path(tmp) / "merged" / "model.safetensors").read_bytes()).hexdigest()
    print(json.dumps({"before": before, "added": peak - before, "max_abs_error": report.max_abs_error,
                      "digest": digest}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=list(SHAPES), default="smollm2")
    parser.add_argument("--settings", nargs="+", default=list(LORA_SETTINGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("SETTING", "HOW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.shape, *args.one)
        return
    print(
        f"## export_merged, {args.shape} shape, float32, peak resident set added (MiB), {args.repeats} runs"
    )
    print("| setting | adapted model MiB | deep copy | shared copy | shared / deep | same file |")
    print("|---|---|---|---|---|---|")
    for setting in args.settings:
        runs: dict[str, list[dict]] = {"deepcopy": [], "shared": []}
        for _ in range(args.repeats):
            for how in runs:  # alternating, so drift hits both
                command = [sys.executable, __file__, "--shape", args.shape, "--one", setting, how]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                runs[how].append(json.loads(out.strip().splitlines()[-1]))
        added = {how: statistics.median(r["added"] for r in rs) for how, rs in runs.items()}
        same = len({r["digest"] for rs in runs.values() for r in rs}) == 1
        before = statistics.median(r["before"] for r in runs["shared"])
        print(f"| {setting} | {before:.0f} | {added['deepcopy']:.0f} | {added['shared']:.0f} | "
              f"{added['shared'] / added['deepcopy']:.3f} | {same} |")  # fmt: skip


if __name__ == "__main__":
    main()
