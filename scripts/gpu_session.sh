#!/usr/bin/env bash
# Everything a session with a GPU lease should run, as ONE call (the lease is short):
#   1. scripts/gpu_base.sh  - the embedded base model (assets/tiny-llava) + premise report, ~7 min;
#      skipped when assets/tiny-llava/model.safetensors exists (BASE=1 runs it anyway)
#   2. scripts/gpu_speed.sh - LLaVA-1.5-7B-shaped prefill speed, dense vs ours, ~1-2 min, if time is left
#
#   bash scripts/gpu_session.sh                                   # on the GPU machine, repo root
#   OUT=/tmp/s SPEED_ENV="DEVICE=cpu DTYPE=float32 SCALE_DOWN=64 BATCH=1 REPEATS=1 WARMUP=0 DECODE=2" \
#     bash scripts/gpu_session.sh --device cpu --set tower.max_steps=3 lm.max_steps=3 \
#     tower.pool_size=512 lm.n_train=512 total_budget_s=0 eval.n_test=16 eval.n_ood=0   # CPU rehearsal
#
# Arguments go to the base recipe. The fixture comes first: its files are written the moment they
# exist, so they come back even if the speed part is cut. $OUT gets at most 7 files (the device
# tool returns 8): gpu_base.sh's six, and speed.tar (speed.json, results, log of gpu_speed.sh).
# TOTAL (570 s) is the deadline for both parts together; the speed part gets what is left, if > 60 s.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/outputs/gpu_session}"
mkdir -p "$OUT"
SECONDS=0
if [ -f assets/tiny-llava/model.safetensors ] && [ "${BASE:-0}" != 1 ]; then
    echo "[gpu_session] assets/tiny-llava exists: base recipe skipped (BASE=1 runs it anyway)"
    base_rc=0
else
    OUT="$OUT" bash scripts/gpu_base.sh "$@"
    base_rc=$?
fi
left=$(( ${TOTAL:-570} - SECONDS ))
echo "[gpu_session] base part exit code $base_rc after ${SECONDS}s; ${left}s left for the speed benchmark"
if [ "$left" -gt 60 ]; then
    SPEED="$(mktemp -d "${TMPDIR:-/tmp}/gpu_speed.XXXXXX")"
    env ${SPEED_ENV:-} OUT="$SPEED" timeout "$left" bash scripts/gpu_speed.sh
    echo "[gpu_session] speed exit code $? after ${SECONDS}s"
    tar -cf "$OUT/speed.tar" -C "$SPEED" . && echo "[gpu_session] wrote $OUT/speed.tar"
    tail -n 3 "$SPEED/log.txt" 2>/dev/null
fi
echo "[gpu_session] done in ${SECONDS}s: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
exit "$base_rc"
