#!/usr/bin/env bash
# The families' speed targets in one run: ours at a 22% token-layer fraction vs dense, side by side, on
# random-weight shapes (bf16, sdpa): LLaVA-NeXT-7B (a 672 x 672 image: base view + 2 x 2 crops,
# 2,928 visual tokens), LLaVA-OneVision-7B (768 x 768: 3,699), Qwen2.5-VL-7B (1036 x 1036: 1,369
# merged units), InternVL3-8B (896 x 896: 2 x 2 tiles of 448 + the thumbnail, 1,280 tokens), Gemma 3 4B
# and 12B (one 896 x 896 image: 256 pooled tokens; sliding-window and global layers) at batch 1 and 4,
# then Qwen2.5-VL-7B again with stage 1 inside its tower (after block INTOWER, default 7; empty: skip).
# Each row: end-to-end prefill ratio, the language model's alone (the
# visual encoder, timed apart, taken off both sides), the encoder's ms.
#
#   OUT=/some/dir bash scripts/gpu_families.sh      # $OUT/<arch>/b<batch>_eager/speed.json, $OUT/log.txt
#
# Knobs: ARCHS ("llava-next-7b llava-onevision-7b qwen2.5-vl-7b internvl3-8b gemma-3-4b gemma-3-12b"), INTOWER (7), RUNS ("1:eager 4:eager"), DECODE (32), and those of
# scripts/gpu_speed.sh (DEVICE, DTYPE, REPEATS, WARMUP, BUDGET, SCALE_DOWN). CPU rehearsal:
#   DEVICE=cpu DTYPE=float32 SCALE_DOWN=64 RUNS="1:eager" REPEATS=1 WARMUP=0 DECODE=2 bash scripts/gpu_families.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_families}
mkdir -p "$OUT"
export RUNS=${RUNS:-"1:eager 4:eager"} DECODE=${DECODE:-32}
INTOWER=${INTOWER-7}
{
  for arch in ${ARCHS:-llava-next-7b llava-onevision-7b qwen2.5-vl-7b internvl3-8b gemma-3-4b gemma-3-12b}; do
    echo "### $arch"
    ARCH=$arch OUT="$OUT/$arch" bash scripts/gpu_speed.sh "$@" | tail -n +2 | grep -E '^(#|\||python)'
  done
  if [ -n "$INTOWER" ]; then
    echo "### qwen2.5-vl-7b, stage 1 inside the tower after block $INTOWER"
    ARCH=qwen2.5-vl-7b OUT="$OUT/qwen2.5-vl-7b-intower" bash scripts/gpu_speed.sh \
      --set pruning.stage1.in_tower_block="$INTOWER" "$@" | tail -n +2 | grep -E '^(#|\||python)'
  fi
} 2>&1 | tee "$OUT/log.txt"
