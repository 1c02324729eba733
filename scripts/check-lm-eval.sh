#!/usr/bin/env bash
# End-to-end check of POST /v1/completions with lm-evaluation-harness's own client (not part of CI:
# lm-eval is heavy). Serves the default model on a free port, then runs lm-eval's
# `local-completions` model on two tiny tasks from local files (tests/e2e/lm_eval_task/): a
# multiple-choice task scored by log-likelihood (echo + logprobs, token-id prompts, several
# prompts per request) and a generation task (stop strings, greedy). Nothing is downloaded: the
# tokenizer lm-eval needs to count context tokens is the served model's own, saved to a temp dir.
#
#   pip install "lm-eval[api]"     # once, into .venv (it leaves torch as it is)
#   ./scripts/check-lm-eval.sh
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
MODEL_NAME="SmolLM2-135M-Instruct"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -c "import lm_eval, tenacity" 2>/dev/null || { echo "lm-eval is not installed: pip install \"lm-eval[api]\"" >&2; exit 2; }

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

cp "$ROOT"/tests/e2e/lm_eval_task/* "$WORK/"
python - "$WORK/tokenizer" <<'EOF'
import sys
from loom.models.default import default_model_path
from loom.tokenizer import load_tokenizer
load_tokenizer(default_model_path()).hf.save_pretrained(sys.argv[1])
EOF

PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
loom serve --port "$PORT" --max-model-len 2048 --dtype float32 >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 240); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "the server did not come up" >&2; exit 1; }

cd "$WORK"  # the task YAMLs name their data files relative to it
lm_eval run \
  --model local-completions \
  --model_args "model=$MODEL_NAME,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer_backend=huggingface,tokenizer=$WORK/tokenizer,tokenized_requests=True,max_length=2048,max_retries=1,num_concurrent=1" \
  --batch_size 4 \
  --tasks loom_tiny_mc,loom_tiny_gen \
  --include_path "$WORK" \
  --output_path "$WORK/results"

# real numbers, not a run that silently scored nothing
python - "$WORK/results" <<'EOF'
import json, math, pathlib, sys
files = sorted(pathlib.Path(sys.argv[1]).rglob("results_*.json"))
results = json.loads(files[-1].read_text())["results"]
for task, metric in (("loom_tiny_mc", "acc,none"), ("loom_tiny_mc", "acc_norm,none"), ("loom_tiny_gen", "exact_match,strip")):
    value = results[task][metric]
    assert isinstance(value, float) and math.isfinite(value), (task, metric, value)
    print(f"{task} {metric} = {value:.3f}")
print("lm-eval check passed")
EOF
