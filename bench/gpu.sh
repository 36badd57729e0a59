#!/usr/bin/env bash
# The main benches and the CUDA test cases on a GPU machine, writing the same tables as on the CPU, into
# bench/results/gpu-<date>.md. Run from the repository root after `make setup`:
#     bash bench/gpu.sh
# The FSDP bench needs 2 GPUs (one rank per GPU, nccl); with one it is skipped and says so.
set -euo pipefail
PY=${PY:-.venv/bin/python}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: torch sees no CUDA device")'
out=bench/results/gpu-$(date +%F).md
mkdir -p bench/results
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
{
  echo "# GPU benches, $(date -u +%FT%TZ)"
  "$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| GPUs:", torch.cuda.device_count())'
  echo
  echo '## CUDA test cases (`pytest -k cuda`: the contract suite, fused kernel, mixed batches, DecodeBatch, sampling, server)'
  "$PY" -m pytest -q -k cuda tests/test_contract.py tests/test_fused.py tests/test_runtime.py tests/test_decode.py \
    tests/test_sampling.py tests/test_serve.py 2>&1 | tail -3
  echo
  for dtype in fp32 bf16; do "$PY" bench/train_step.py train --device cuda --dtype "$dtype" --reps 7 2>/dev/null; echo; done
  "$PY" bench/train_step.py memory --device cuda 2>/dev/null; echo
  "$PY" bench/train_step.py inference --device cuda --reps 9 2>/dev/null; echo
  "$PY" bench/sampling_cost.py --device cuda --rows 16 --new-tokens 32 --reps 3 2>/dev/null; echo
  if [ "$gpus" -ge 2 ]; then
    echo '## FSDP against DDP, 2 GPUs (nccl)'
    "$PY" bench/fsdp_memory.py --steps 4 --length 512 2>/dev/null | head -8
  else
    echo "## FSDP against DDP: skipped, it needs 2 GPUs and this machine has $gpus"
  fi
} | tee "$out"
echo "written: $out"
