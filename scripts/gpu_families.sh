#!/usr/bin/env bash
# The families' speed targets in one run: ours at a 22% token-layer fraction vs dense, side by side, on
# random-weight shapes (bf16, sdpa): LLaVA-NeXT-7B (a 672 x 672 image: base view + 2 x 2 crops,
# 2,928 visual tokens), LLaVA-OneVision-7B (768 x 768: 3,699), Qwen2.5-VL-7B (1036 x 1036: 1,369
# merged units), InternVL3-8B (896 x 896: 2 x 2 tiles of 448 + the thumbnail, 1,280 tokens), Gemma 3
# 4B and 12B (one 896 x 896 image: 256 pooled tokens; sliding-window and global layers), Qwen3-VL-8B
# (1024 x 1024: 1,024 merged units; DeepStack) and Qwen3.5-27B (the same image; 48 Gated DeltaNet and
# 16 attention layers, stage 2 at layer 3, its first attention layer) at batch 1 and 4, then
# Qwen2.5-VL-7B and Qwen3-VL-8B again with stage 1 inside the tower (after block INTOWER, default 7, a
# full-attention block of Qwen2.5-VL's; empty: skip; INTOWER_ARCHS: which). Each row: end-to-end
# prefill ratio, the language model's alone (the
# visual encoder, timed apart, taken off both sides), the encoder's ms.
#
#   OUT=/some/dir bash scripts/gpu_families.sh      # $OUT/<arch>/b<batch>_eager/speed.json, $OUT/log.txt
#
# Knobs: ARCHS ("llava-next-7b llava-onevision-7b qwen2.5-vl-7b internvl3-8b gemma-3-4b gemma-3-12b
# qwen3-vl-8b qwen3.5-27b"), INTOWER (7), INTOWER_ARCHS ("qwen2.5-vl-7b qwen3-vl-8b"), RUNS ("1:eager
# 4:eager"), DECODE (32), and those of scripts/gpu_speed.sh (DEVICE, DTYPE, REPEATS, WARMUP, BUDGET, SCALE_DOWN). CPU rehearsal:
#   DEVICE=cpu DTYPE=float32 SCALE_DOWN=64 RUNS="1:eager" REPEATS=1 WARMUP=0 DECODE=2 bash scripts/gpu_families.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_families}
mkdir -p "$OUT"
export RUNS=${RUNS:-"1:eager 4:eager"} DECODE=${DECODE:-32}
INTOWER=${INTOWER-7}
{
  for arch in ${ARCHS:-llava-next-7b llava-onevision-7b qwen2.5-vl-7b internvl3-8b gemma-3-4b gemma-3-12b qwen3-vl-8b qwen3.5-27b}; do
    echo "### $arch"
    extra=()
    case $arch in  # a hybrid decoder's stage 2 scores at a softmax-attention layer (0-2 are Gated DeltaNet)
      qwen3.5-*) extra=(--set pruning.stage2.layer=3) ;;
    esac
    ARCH=$arch OUT="$OUT/$arch" bash scripts/gpu_speed.sh ${extra[@]+"${extra[@]}"} "$@" | tail -n +2 | grep -E '^(#|\||python)'
  done
  if [ -n "$INTOWER" ]; then
    for arch in ${INTOWER_ARCHS:-qwen2.5-vl-7b qwen3-vl-8b}; do
      echo "### $arch, stage 1 inside the tower after block $INTOWER"
      ARCH=$arch OUT="$OUT/$arch-intower" bash scripts/gpu_speed.sh \
        --set pruning.stage1.in_tower_block="$INTOWER" "$@" | tail -n +2 | grep -E '^(#|\||python)'
    done
  fi
} 2>&1 | tee "$OUT/log.txt"
