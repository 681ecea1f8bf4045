#!/usr/bin/env bash
# GPU check (issue 13 item 5), one short command: the default job and a 10-fact grid on cuda in
# bf16, then a 2-fact grid through accelerate's device map; prints each timing and, last, one JSON
# line. Needs a CUDA device; run from anywhere:
#     bash tests/device/check.sh            # PYTHON=... to pick the interpreter (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT_DIR:-$(mktemp -d)/probe-device-check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check is for a GPU machine')"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
step() {  # name, command...: run it, print and remember its seconds
  local name=$1; shift
  local t0=$(date +%s%N)
  "$@" > "$OUT/$name.log" 2>&1 || { echo "$name FAILED (log: $OUT/$name.log)"; tail -5 "$OUT/$name.log"; exit 1; }
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  local s=$(( ms / 1000 )).$(printf '%03d' $(( ms % 1000 )))
  printf '%-28s %10s s\n' "$name" "$s"
  eval "T_${name//-/_}=$s"
}
step default-job "$PY" -m probe.cli run --device cuda --dtype bfloat16 --out "$OUT/default_job" --quiet
step grid-10-facts "$PY" -m probe.cli grid --device cuda --dtype bfloat16 --max-facts 10 --defenses all \
    --attacks head-projection,probability-delta,pd2 --out "$OUT/grid10" --quiet
step grid-device-map "$PY" -m probe.cli grid --device-map auto --dtype bfloat16 --max-facts 2 \
    --defenses fact-erasure --attacks head-projection --out "$OUT/grid_device_map" --quiet
echo "{\"default_job_s\": $T_default_job, \"grid10_s\": $T_grid_10_facts, \"grid_device_map_s\": $T_grid_device_map, \"out\": \"$OUT\"}"
