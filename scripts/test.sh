#!/usr/bin/env bash
# Installs what the tests need into .venv, then runs lint, the layer contracts and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-venv.sh test
. .venv/bin/activate
ruff check loom tests
lint-imports
python -m pytest "$@"
