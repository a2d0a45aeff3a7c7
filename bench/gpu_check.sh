#!/usr/bin/env bash
# The prepared GPU check (under 10 minutes on one H100/H200): real-size random-weight models, a few
# steps of sft (full, Qwen3-0.6B), reward (LoRA, Qwen3-0.6B), QLoRA sft (Qwen3-8B) at seq 2048, and PPO
# (LoRA on the shared Qwen3-0.6B base);
# per case the memory estimate against torch.cuda.max_memory_allocated, tokens/s and MFU.
#   bash bench/gpu_check.sh [OUT_DIR]          then: python bench/gpu_check.py --report OUT_DIR/gpu_check.json
# Needs a CUDA machine with the project's dependencies (make install), or wheels of them in .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT_DIR"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
set -o pipefail
python3 bench/gpu_check.py --out /tmp/gpu_check_work --json "$OUT_DIR/gpu_check.json" --budget-s "${BUDGET_S:-420}" \
  2>&1 | tee "$OUT_DIR/gpu_check.log"
