"""The compiled decode step and the eager engine on idle cores and beside busy processes, one thread count.

The bundled SmolLM2-135M-Instruct (fp32) with the quickstart's adapter, one chat prompt, 16 greedy tokens, the
rate from the first new token to the last, median of 2: first on idle cores, then with HOGS processes
spinning in a Python loop beside it (on a 2-core machine, 2 hogs: every core shared). Inductor's C++ kernels
open an OpenMP parallel region per kernel, hundreds a token, and each waits for every thread; run once per
thread count (inductor fixes it when it compiles), and with OMP_WAIT_POLICY set to compare waiting policies.

    [HOGS=2] python bench/compiled_contention.py --threads 2
    OMP_NUM_THREADS=1 python bench/compiled_contention.py --threads 1
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import compiled_decode, engine_rate, one_stream_setup  # noqa: E402


def main() -> int:
    from deltatune.runtime.compiled import CompiledDecoder

    hogs = int(os.environ.get("HOGS", "2"))
    args, model, prompt = one_stream_setup(__doc__.splitlines()[0], reps=2)

    decoder = CompiledDecoder(model, "tuned")
    compiled_decode(decoder, prompt, 8)  # compiles

    def rates() -> dict[str, float]:
        return {
            "eager": round(
                statistics.median(engine_rate(model, [prompt], "tuned", 16) for _ in range(args.reps)), 1
            ),
            "compiled": round(
                statistics.median(1 / compiled_decode(decoder, prompt, 16)[0] for _ in range(args.reps)), 1
            ),
        }

    idle = rates()
    spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        busy = rates()
    finally:
        for process in spinning:
            process.kill()
    print(json.dumps({
        "threads": args.threads, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "hogs": hogs,
        "tokens_per_s_idle": idle, "tokens_per_s_beside_hogs": busy,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
