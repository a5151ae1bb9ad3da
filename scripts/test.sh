#!/usr/bin/env bash
# Set up everything the tests need, lint, then run the whole test suite (root and BPF included).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest -ra "$@"
