#!/usr/bin/env bash
# Every GPU measurement in one call (about 6 minutes on one H100/H200):
#   1. GPT-2 124M pretraining through `llm pretrain` (bench/gpu_pretrain.py): tokens/s, MFU, compile time;
#   2. the stage check on real-size random-weight models (bench/gpu_check.py): memory estimate vs measured.
#   bash bench/gpu_run.sh [OUT_DIR]
# PRETRAIN_CASES / CHECK_CASES choose the cases of each part ("none" skips it), *_BUDGET_S when to stop starting
# new ones. Needs a CUDA machine with the project's dependencies (make install), or wheels of them in .whl/.
# then, on any machine: python bench/gpu_pretrain.py --report OUT_DIR/gpu_pretrain.json
#                       python bench/gpu_check.py --report OUT_DIR/gpu_check.json
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/gpu_run}}
mkdir -p "$OUT_DIR"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
[ "${PRETRAIN_CASES:-}" = none ] || python3 bench/gpu_pretrain.py --out /tmp/gpu_pretrain --json "$OUT_DIR/gpu_pretrain.json" --budget-s "${PRETRAIN_BUDGET_S:-200}" \
  --cases "${PRETRAIN_CASES:-compile-b32-v64,eager-b16-v64,compile-b32-v1}" 2>&1 | tee "$OUT_DIR/gpu_pretrain.log" | grep -v "^step [0-9]*/"
[ "${CHECK_CASES:-}" = none ] || python3 bench/gpu_check.py --out /tmp/gpu_check_work --json "$OUT_DIR/gpu_check.json" --budget-s "${CHECK_BUDGET_S:-240}" \
  ${CHECK_CASES:+--cases "$CHECK_CASES"} 2>&1 | tee "$OUT_DIR/gpu_check.log" | tail -40
