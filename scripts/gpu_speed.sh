#!/usr/bin/env bash
# Prefill speed of ours at a 22% token-layer fraction vs dense, on a LLaVA-1.5-7B-shaped model with
# random weights (CLIP-L/336 tower, 576 visual tokens, 4096-d 32-layer Llama), batch 16, bf16, sdpa.
# Also time to first token, decode tokens/s and peak memory. ~1-2 minutes on one H100/H200.
#
#   OUT=/some/dir bash scripts/gpu_speed.sh          # writes $OUT/speed.json and $OUT/log.txt
#
# Needs python3 with torch (CUDA), transformers >= 5.17 and pyyaml; tpkit need not be installed and
# nothing is downloaded. The last line of the log is the headline ratio. Knobs (environment):
# ARCH (llava-1.5-7b), DEVICE (cuda), DTYPE (bfloat16), BATCH (16), REPEATS (10), WARMUP (3),
# DECODE (32 new tokens), BUDGET (0.22), SCALE_DOWN (1; e.g. 64 for a CPU smoke test of this script:
#   DEVICE=cpu DTYPE=float32 SCALE_DOWN=64 BATCH=1 REPEATS=1 WARMUP=0 DECODE=2 bash scripts/gpu_speed.sh).
# Extra arguments go to evaluate.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_speed}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  echo "# $(date -u +%FT%TZ) $(hostname) git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  fi
  "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'
  "$PY" evaluate.py --random-init "${ARCH:-llava-1.5-7b}" --scale-down "${SCALE_DOWN:-1}" \
    --device "${DEVICE:-cuda}" --out "$OUT" \
    --set model.attn_implementation=sdpa \
    --set random_init.dtype="${DTYPE:-bfloat16}" \
    --set random_init.budget="${BUDGET:-0.22}" \
    --set speed.batch_size="${BATCH:-16}" \
    --set speed.repeats="${REPEATS:-10}" \
    --set speed.warmup="${WARMUP:-3}" \
    --set speed.decode_tokens="${DECODE:-32}" \
    --set eval.progress=false \
    "$@"
} 2>&1 | tee "$OUT/log.txt"
