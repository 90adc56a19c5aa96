#!/usr/bin/env bash
# Serve a recipe's model to any OpenAI client: vLLM behind rltrain's gateway (calls under /rollouts/<id>/v1 are
# recorded with their token ids and logprobs; plain /v1 calls are served only).
#
#   scripts/serve.sh [RECIPE] [--port 8000] [--host ADDRESS] [--set section.field=value ...]
#
# rltrain starts `vllm serve` on 127.0.0.1 (a free port), waits for it, and stops it on Ctrl-C. Another bind
# address than 127.0.0.1 needs gateway.api_key_env (the gateway refuses to serve unauthenticated otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE="${1:-recipes/room_selection_grpo_qwen.yaml}"
[[ $# -gt 0 ]] && shift
exec "${RLTRAIN:-rltrain}" serve "$RECIPE" "$@"
