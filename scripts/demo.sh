#!/usr/bin/env bash
# The demo: set up what is missing, then run the whole path on this machine.
#   scripts/demo.sh [--duration SECONDS] [--speed FACTOR] [--workdir DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" run
cd "$ROOT"
exec "${VENV:-$ROOT/.venv}/bin/python" -m devstack.demo "$@"
