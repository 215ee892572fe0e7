#!/usr/bin/env bash
# Train the embedded base model (assets/tiny-llava) on one GPU, in one command:
#
#   bash scripts/gpu_base.sh                      # on the GPU machine, from the repository root
#   FIXTURE=tiny-qwen2-vl bash scripts/gpu_base.sh   # the second model (configs/fixture/tiny_qwen2_vl_gpu.yaml)
#   OUT=/tmp/out bash scripts/gpu_base.sh --device cpu --set tower.max_steps=3 lm.max_steps=3 ...  # CPU rehearsal
#
# Extra arguments go to `tpkit fixture` (after the config). Writes to $OUT
# (default ./outputs/gpu_base), at most 6 files, none deeper than $OUT/a/file:
#   log.txt                 everything printed (also on the terminal)
#   $FIXTURE.tar            the model directory (tiny-llava.tar or tiny-qwen2-vl.tar): config.json,
#                           model.safetensors, processor files, metrics.json, recipe.yaml
#                           (unpack: tar -xf tiny-llava.tar -C assets/, or tiny-qwen2-vl.tar)
#   metrics.json            tower F1, dense accuracy per question type (test, ood), timings, machine
#   premise/premise.json, premise/curves.png, premise/curves_pixel.png
#                           stage-1 premise report (CLS cosine, default knee) on 300 test images
# Needs: python3 with torch, transformers, tokenizers, pillow, numpy, pyyaml, tqdm, matplotlib; no
# network, no `datasets`, tpkit not installed (PYTHONPATH=$PWD). Expected: ~7 minutes on an H100/H200
# (recipe ~6.5 min: data 20 s, tower 110 s, LLaVA 240 s, eval 10 s; premise report ~30 s).
set -u
set -o pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
OUT="${OUT:-$PWD/outputs/gpu_base}"  # outputs/ is git-ignored
PY="${PYTHON:-python3}"
NAME="${FIXTURE:-tiny-llava}"
case "$NAME" in
    tiny-llava) CONFIG=configs/fixture/tiny_gpu.yaml ;;
    tiny-qwen2-vl) CONFIG=configs/fixture/tiny_qwen2_vl_gpu.yaml ;;
    *) echo "FIXTURE=$NAME: give tiny-llava or tiny-qwen2-vl" >&2; exit 2 ;;
esac
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_base.XXXXXX")"
MODEL="$WORK/$NAME"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
SECONDS=0
: >"$LOG"

log() { echo "[gpu_base $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

log "start; OUT=$OUT WORK=$WORK args: $*"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'
    nproc
} 2>&1 | tee -a "$LOG"

# 1. The recipe (data, tower, LLaVA, save, reload, evaluate). Its own budgets keep it to ~5 minutes;
#    the timeout only guards against a hang, so that whatever was saved still comes back.
timeout "${RECIPE_TIMEOUT:-560}" "$PY" -m tpkit fixture --config "$CONFIG" --out "$MODEL" --archive "$OUT/$NAME.tar" "$@" 2>&1 | tee -a "$LOG"
rc=$?
log "recipe exit code $rc after ${SECONDS}s"

# 2. Ship the model directory as one file (whatever exists, even after a failure).
if [ -f "$MODEL/model.safetensors" ]; then
    [ -f "$OUT/$NAME.tar" ] || tar -cf "$OUT/$NAME.tar" -C "$WORK" "$NAME"; log "wrote $OUT/$NAME.tar ($(du -h "$OUT/$NAME.tar" | cut -f1))"
    [ -f "$MODEL/metrics.json" ] && cp "$MODEL/metrics.json" "$OUT/metrics.json"
else
    log "no model.safetensors in $MODEL"
fi

# 3. The premise report, when the model was saved.
if [ -f "$MODEL/model.safetensors" ]; then
    N_PREMISE="${N_PREMISE:-300}"
    "$PY" -m tpkit data synthetic --out "$WORK/synth" --split test --n "$N_PREMISE" --seed 0 --workers 8 2>&1 | tail -n 3 | tee -a "$LOG"
    timeout 100 "$PY" -m tpkit premise --model "$MODEL" --data "$WORK/synth" --n "$N_PREMISE" \
        --out "$OUT/premise" 2>&1 | tee -a "$LOG" || log "premise report (cosine) failed"
else
    log "premise report skipped (no saved model)"
fi

log "done in ${SECONDS}s; files in $OUT:"
(cd "$OUT" && find . -type f | sort | xargs ls -l) 2>&1 | tee -a "$LOG"
exit "$rc"
