#!/usr/bin/env bash
# The families' speed targets in one run: ours at a 22% token-layer fraction vs dense, side by side, on
# random-weight 7B shapes (bf16, sdpa): LLaVA-NeXT-7B (a 672 x 672 image: base view + 2 x 2 crops,
# 2,928 visual tokens) and LLaVA-OneVision-7B (768 x 768: 3,699) at batch 1 and 4, and every other
# architecture listed in ARCHS. Each row: end-to-end prefill ratio, the language model's alone (the
# visual encoder, timed apart, taken off both sides), the encoder's ms.
#
#   OUT=/some/dir bash scripts/gpu_families.sh      # $OUT/<arch>/b<batch>_eager/speed.json, $OUT/log.txt
#
# Knobs: ARCHS ("llava-next-7b llava-onevision-7b"), RUNS ("1:eager 4:eager"), DECODE (32), and those of
# scripts/gpu_speed.sh (DEVICE, DTYPE, REPEATS, WARMUP, BUDGET, SCALE_DOWN). CPU rehearsal:
#   DEVICE=cpu DTYPE=float32 SCALE_DOWN=64 RUNS="1:eager" REPEATS=1 WARMUP=0 DECODE=2 bash scripts/gpu_families.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_families}
mkdir -p "$OUT"
export RUNS=${RUNS:-"1:eager 4:eager"} DECODE=${DECODE:-32}
for arch in ${ARCHS:-llava-next-7b llava-onevision-7b}; do
  echo "### $arch"
  ARCH=$arch OUT="$OUT/$arch" bash scripts/gpu_speed.sh "$@" | tail -n +2 | grep -E '^(#|\||python)'
done 2>&1 | tee "$OUT/log.txt"
