#!/usr/bin/env bash
# Speed of ours at a 22% token-layer fraction vs dense, side by side in each run, on a LLaVA-1.5-7B-shaped
# model with random weights (CLIP-L/336 tower, 576 visual tokens, 4096-d 32-layer Llama), bf16, sdpa:
# prefill latency (end to end, and the language model's alone: the visual encoder's time, measured
# apart, taken off both), time to first token, decode tokens/s over DECODE new tokens, peak memory.
#
#   OUT=/some/dir bash scripts/gpu_speed.sh          # writes $OUT/<run>/speed.json, $OUT/log.txt
#
# RUNS lists the runs as BATCH:MODE (MODE = eager, or a torch.compile mode: dense and ours are compiled
# alike, ours with pruning.bucket=16 so that its pruned lengths take a few values; compiling takes
# minutes on the first calls, which are warm-up). Default: "16:eager 1:eager 1:reduce-overhead".
# Needs python3 with torch (CUDA), transformers >= 5.17 and pyyaml; tpkit need not be installed and
# nothing is downloaded. The last lines of the log are one row per run and the headline ratios.
# Knobs (environment): ARCH (llava-1.5-7b), DEVICE (cuda), DTYPE (bfloat16), REPEATS (10), WARMUP (3),
# DECODE (128 new tokens), BUDGET (0.22), SCALE_DOWN (1; e.g. 64 for a CPU rehearsal of this script:
#   DEVICE=cpu DTYPE=float32 SCALE_DOWN=64 RUNS="1:eager" REPEATS=1 WARMUP=0 DECODE=2 bash scripts/gpu_speed.sh).
# Extra arguments go to evaluate.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_speed}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
RUNS=${RUNS:-"16:eager 1:eager 1:reduce-overhead"}
{
  echo "# $(date -u +%FT%TZ) $(hostname) git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  fi
  "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'
  for run in $RUNS; do
    batch=${run%%:*}; mode=${run#*:}
    compile=none; bucket=0
    if [ "$mode" != eager ]; then compile=$mode; bucket=16; fi
    echo "## batch $batch, $mode"
    "$PY" evaluate.py --random-init "${ARCH:-llava-1.5-7b}" --scale-down "${SCALE_DOWN:-1}" \
      --device "${DEVICE:-cuda}" --out "$OUT/b${batch}_${mode}" \
      --set model.attn_implementation=sdpa \
      --set random_init.dtype="${DTYPE:-bfloat16}" \
      --set random_init.budget="${BUDGET:-0.22}" \
      --set speed.batch_size="$batch" \
      --set speed.repeats="${REPEATS:-10}" \
      --set speed.warmup="${WARMUP:-3}" \
      --set speed.decode_tokens="${DECODE:-128}" \
      --set speed.compile="$compile" \
      --set pruning.bucket="$bucket" \
      --set eval.progress=false \
      "$@"
  done
  "$PY" - "$OUT" $RUNS <<'EOF'
import json, sys
out, runs = sys.argv[1], sys.argv[2:]
print("| batch | mode | prefill ms dense -> ours | prefill | LM prefill | vision ms | TTFT | decode tok/s dense -> ours | decode |")
print("|---|---|---|---|---|---|---|---|---|")
for run in runs:
    batch, mode = run.split(":")
    r = json.load(open(f"{out}/b{batch}_{mode}/speed.json"))
    d, o = r["speed"]["dense"], r["speed"][next(k for k in r["speed"] if k != "dense")]
    fmt = lambda x, f: "–" if x is None else format(x, f)
    print(f"| {batch} | {mode} | {d['prefill']['median_ms']:.1f} -> {o['prefill']['median_ms']:.1f} | "
          f"{o['prefill_speedup']:.2f}x | {fmt(r.get('lm_prefill_speedup'), '.2f')}x | {fmt(r.get('vision_ms'), '.1f')} | "
          f"{fmt(o.get('ttft_speedup'), '.2f')}x | "
          f"{fmt(d.get('decode_tokens_per_s'), '.0f')} -> {fmt(o.get('decode_tokens_per_s'), '.0f')} | "
          f"{fmt(o.get('decode_speedup'), '.2f')}x |")
EOF
} 2>&1 | tee "$OUT/log.txt"
