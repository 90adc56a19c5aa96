#!/usr/bin/env bash
# One command for GPU training: start vLLM, train, stop it.
#
#   scripts/train_gpu.sh [RECIPE] [--set section.field=value ...]
#
# One GPU (the default): `rltrain train` starts `vllm serve` itself on the same card (the recipe's
#   engine.vllm.gpu_memory_utilization keeps it small), supervises it and stops it when training ends.
# Several GPUs: give vLLM and the trainer GPUs of their own:
#   VLLM_GPUS=0 TRAIN_GPUS=1,2,3 ACCELERATE_CONFIG=recipes/accelerate/zero2.yaml scripts/train_gpu.sh RECIPE
#   starts the recipe's vLLM server once on VLLM_GPUS (tensor parallel over them), waits for /health, runs one
#   trainer process per TRAIN_GPUS entry with `accelerate launch` against it (engine.vllm.url), and stops vLLM
#   on exit. ZeRO-3 and FSDP configs need engine.vllm.weight_sync=merged. The trainer processes are rank-aware
#   (README "Scale out"): the main one samples every step through vLLM and scatters the rows, validates and writes
#   the run directory; TASKS_PER_STEP x NUM_GENERATIONS must be a multiple of the number of TRAIN_GPUS.
# Environment: RLTRAIN (default: rltrain), PYTHON (default: python, the one rltrain is installed in),
#   VLLM_PORT (default 8100), VLLM_MEMORY (default 0.9: vLLM has its GPUs to itself).
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE="${1:-recipes/room_selection_grpo_qwen.yaml}"
[[ $# -gt 0 ]] && shift
RLTRAIN="${RLTRAIN:-rltrain}"

if [[ -z "${TRAIN_GPUS:-}" ]]; then
  exec "$RLTRAIN" train "$RECIPE" "$@"
fi

: "${VLLM_GPUS:?set VLLM_GPUS (e.g. 0) together with TRAIN_GPUS (e.g. 1,2,3)}"
PYTHON="${PYTHON:-python}"
PORT="${VLLM_PORT:-8100}"
CONFIG="${ACCELERATE_CONFIG:-recipes/accelerate/zero2.yaml}"
count() { local IFS=,; set -- $1; echo $#; }
mkdir -p runs
LOG="runs/vllm-${PORT}.log"

echo "vLLM on GPUs ${VLLM_GPUS} (port ${PORT}, log ${LOG}); trainer on GPUs ${TRAIN_GPUS} (${CONFIG})"
CUDA_VISIBLE_DEVICES="$VLLM_GPUS" "$PYTHON" -m rltrain.engines.vllm_server "$RECIPE" "$@" --port "$PORT" \
  --set "engine.vllm.tensor_parallel_size=$(count "$VLLM_GPUS")" \
  --set "engine.vllm.gpu_memory_utilization=${VLLM_MEMORY:-0.9}" >"$LOG" 2>&1 &
VLLM_PID=$!
trap 'kill "$VLLM_PID" 2>/dev/null || true; wait "$VLLM_PID" 2>/dev/null || true' EXIT

until curl -sf "http://127.0.0.1:${PORT}/health" >/dev/null; do
  if ! kill -0 "$VLLM_PID" 2>/dev/null; then
    echo "vLLM exited before it was ready; the end of ${LOG}:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
  sleep 2
done

CUDA_VISIBLE_DEVICES="$TRAIN_GPUS" accelerate launch --config_file "$CONFIG" --num_processes "$(count "$TRAIN_GPUS")" \
  "$(command -v "$RLTRAIN")" train "$RECIPE" "$@" --set "engine.vllm.url=http://127.0.0.1:${PORT}"
