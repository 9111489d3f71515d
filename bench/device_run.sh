#!/usr/bin/env bash
# The ONE script of a device session (docs/accelerators.md; /work/shared/device/README.md).
#
#   bash ../shared/device/fetch_wheels.sh          # here, once: the wheels the device image lacks -> .whl/
#   bash bench/device_run.sh                       # on the device (run tool, carry .whl): tables -> $OUT
#   PYTHON=.venv/bin/python bash bench/device_run.sh --smoke   # here, on CPU: every part, tiny configs (minutes)
#
# Parts, most important first, each under `timeout`, skipped when it could not finish inside
# TOTAL_S (default 600 s: with ~1 min of machine start-up, about 11 of the 15 device minutes):
#   imports    jax/flax/torch versions, devices, nvidia-smi
#   device     bench/device.py: base + large, the trainer's own step (auto: cudnn, unrolled, rbg, no remat)
#              and XLA attention, beside the PyTorch peer (ratios)
#   rng        base train step with threefry / unsafe_rbg dropout bits (rbg, the default, is in `device`)
#   profile    bench/profile_step.py: the 25 costliest device ops of the base step, by category
#   precision  fp32 parity with transformers per precision option (None, "highest")
#   layout     base train step scanned, remat none and dots (unrolled is in `device`): compile s, ms/step
#   flags      base train step with the "tuned" XLA GPU flag set (chinese_clip_jax/training/xla_flags.py)
#   estimate   bench/estimate_vs_real.py: the compile-only peak estimate (ccj-train --compile-only)
#              of the base and large step at batch 256 against the device's real peak
#   memory     bench/max_batch.py: largest batch per size and remat policy, and its pairs/s
#   serve      bench/serve_load.py: ccj-serve's q/s, p50/p99 latency and RSS under concurrent clients
#   lora       bench/lora_memory.py: full fine-tuning vs LoRA rank 4/8 vs the last 2 layers, base
#              step: trainable share, state and XLA temporaries (device memory), step time
# Each part writes $OUT/<part>.txt (its table) and $OUT/<part>.err; $OUT/summary.txt lists
# start, end, status and seconds of each part.
set -uo pipefail
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-600}
if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  TOTAL_S=${TOTAL_S_SMOKE:-3000}
  SIZES=smoke; S=--smoke; PEAK="--peak-tflops 1"; PEER="--peer torch"
else
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl || exit 3
  export PYTHONPATH=$SITE:$PWD
  SIZES=base-patch16,large-patch14; S=; PEAK=; PEER=
fi
START=$SECONDS
log() { echo "[$((SECONDS - START))s] $*" | tee -a "$OUT/summary.txt"; }

part() {  # part NAME TIMEOUT_S CMD ARGS...
  local name=$1 limit=$2 rc
  shift 2
  [ "$SMOKE" = 1 ] && limit=$((limit * ${SMOKE_SCALE:-8}))  # a (shared) CPU compiles slowly
  if [ "$SMOKE" = 0 ] && [ $((SECONDS - START + limit)) -gt "$TOTAL_S" ]; then
    log "skip $name: needs up to ${limit}s, $((TOTAL_S - SECONDS + START))s left of TOTAL_S=$TOTAL_S"
    return
  fi
  log "start $name (timeout ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.txt" 2>"$OUT/$name.err"
  rc=$?
  log "end $name: status $rc$([ $rc = 124 ] && echo ' (timed out)')"
  tail -n 60 "$OUT/$name.txt"
  [ $rc = 0 ] || tail -n 5 "$OUT/$name.err"
}

log "imports"
"$PY" - >"$OUT/imports.txt" 2>&1 <<'EOF' || { cat "$OUT/imports.txt"; exit 4; }
import jax, flax, optax, orbax.checkpoint, grain, ml_collections, chinese_clip_jax
print("jax", jax.__version__, "flax", flax.__version__, "devices", jax.devices())
try:
    import torch, transformers
    print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)
except ImportError as e:
    print("no torch peer:", e)
EOF
cat "$OUT/imports.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >>"$OUT/imports.txt"

B=base-patch16
[ "$SMOKE" = 1 ] && B=smoke
part device 400 "$PY" bench/device.py $S $PEAK $PEER --sizes $SIZES --impls auto,xla --budget-s 150 --peer-budget-s 120 \
  --json "$OUT/device.json"
if [ "$SMOKE" = 1 ]; then
  part estimate 60 "$PY" bench/estimate_vs_real.py --smoke
else
  part estimate 90 "$PY" bench/estimate_vs_real.py --sizes $SIZES --batch 256
fi
part rng 90 "$PY" bench/device.py $S $PEAK --sizes $B --programs train --rng-impls threefry,unsafe_rbg \
  --peer none --steps 3 --repeats 3
part profile 80 "$PY" bench/profile_step.py $S --size $B --steps 5 --logdir "${TMPDIR:-/tmp}/ccj_trace"
part precision 60 "$PY" bench/precision_check.py $S
part layout 110 "$PY" bench/device.py $S $PEAK --sizes $B --programs train --layouts scan --remat auto,dots \
  --peer none --steps 3 --repeats 3
part flags 60 "$PY" bench/device.py $S $PEAK --sizes $B --programs train --xla-flags tuned \
  --peer none --steps 3 --repeats 3
if [ "$SMOKE" = 1 ]; then
  part memory 100 "$PY" bench/max_batch.py --smoke --capacity-gib 0.01 --remats none
else
  part memory 100 "$PY" bench/max_batch.py --sizes $SIZES --remats none,dots,full --budget-s 50
fi
# ccj-serve under load: HTTP q/s and p50/p99 beside the encoder without HTTP, RSS before/after
# (two processes share the device: no preallocation). Needs the serve extra's wheels (fastapi, uvicorn).
if [ "$SMOKE" = 1 ]; then
  part serve 60 env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" bench/serve_load.py --tiny --images 32 --requests 200 --direct 50
else
  part serve 150 env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" bench/serve_load.py --preset chinese-clip-vit-base-patch16 \
    --images 256 --requests 5000 --clients 16 --max-batch 64 --budget-s 60 --direct 500
fi
if [ "$SMOKE" = 1 ]; then
  part lora 60 "$PY" bench/lora_memory.py --tiny --steps 2
else
  part lora 120 "$PY" bench/lora_memory.py --preset chinese-clip-vit-base-patch16 --batch 64 --steps 3
fi
# The profile's trace for TensorBoard comes back only when small (the fetch has size limits).
TRACE=$(ls -d "${TMPDIR:-/tmp}"/ccj_trace/plugins/profile/* 2>/dev/null | tail -1)
if [ -n "$TRACE" ] && [ "$(du -sm "$TRACE" | cut -f1)" -lt 20 ]; then
  mkdir -p "$OUT/trace" && cp "$TRACE"/*.xplane.pb "$OUT/trace/" 2>/dev/null
fi
log "done in $((SECONDS - START))s; tables in $OUT"
