#!/usr/bin/env bash
# One GPU session on one H100/H200, under 10 minutes (the CUDA tests <= 200 s, then benchmarks.decode at
# MedPLIB-7b-2e's shapes with random weights, bf16 then 4-bit, <= 180 s each, 6 minutes together); writes into $OUT (default benchmarks/out):
# gpu.txt, gpu_tests.log, bf16.log, 4bit.log and PERFORMANCE-gpu.md (rows to paste into docs/PERFORMANCE.md).
#   here, first:   bash benchmarks/gpu_prepare.sh        (bitsandbytes + transformers for a machine offline)
#   there:         bash benchmarks/gpu_session.sh        (carry .gpu_site)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .gpu_site ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site \
    .gpu_site/wheels/*.whl && export PYTHONPATH="/tmp/gpu_site:$PWD/.gpu_site/bnb:${PYTHONPATH:-}"
  if ! "$PY" -c "import transformers" 2>/dev/null; then  # its pins may not fit the machine: use the machine's
    echo "the carried transformers does not import here; using the installed one"
    export PYTHONPATH="$PWD/.gpu_site/bnb"
  fi
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee "$OUT/gpu.txt"
"$PY" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu.txt"
timeout 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_engine_fast_decode.py tests/test_engine_quantize.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 180 "$PY" -m benchmarks.decode --size 7b-2e --device cuda --dtype bfloat16 --new-tokens 256 --json 2>&1 \
  | tee "$OUT/bf16.log"
timeout 180 "$PY" -m benchmarks.decode --size 7b-2e --device cuda --dtype bfloat16 --quant 4bit --new-tokens 256 \
  --json 2>&1 | tee "$OUT/4bit.log"
"$PY" -m benchmarks.performance_table "$OUT/bf16.log" "$OUT/4bit.log" | tee "$OUT/PERFORMANCE-gpu.md"
