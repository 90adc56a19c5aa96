#!/usr/bin/env bash
# Escalate on a GPU: prompt optimisation (APO) first, then GRPO on the same agent, tasks and reward, with the
# vLLM engine that the recipe names (rltrain starts, supervises and stops it).
#
#   scripts/escalate_gpu.sh [RECIPE] [--set section.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE="${1:-recipes/room_selection_grpo_qwen.yaml}"
[[ $# -gt 0 ]] && shift
exec "${RLTRAIN:-rltrain}" escalate "$RECIPE" "$@"
