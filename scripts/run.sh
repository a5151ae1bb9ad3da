#!/usr/bin/env bash
# The main job: set up, then run the sensor streaming live events as NDJSON to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/edr-sensor run --output - "$@"
