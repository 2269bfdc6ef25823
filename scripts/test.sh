#!/usr/bin/env bash
# Installs everything (scripts/install.sh), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "[$(date +%T)] installing" >&2
bash scripts/install.sh
echo "[$(date +%T)] running the tests" >&2
exec "${PYTHON:-python3}" -m pytest -q "$@"
