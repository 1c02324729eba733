#!/usr/bin/env bash
# Sets up .venv if needed, then serves the default model on 127.0.0.1:8000 (extra args go to `loom serve`).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-venv.sh
exec .venv/bin/loom serve --host 127.0.0.1 --port 8000 "$@"
