#!/usr/bin/env bash
# The test suite: set up what is missing, then lint, type-check and run pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k wire). The tests run in
# PYTEST_WORKERS parallel workers (pytest-xdist; 4 by default, 0 = in this process).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" dev
cd "$ROOT"
BIN="${VENV:-$ROOT/.venv}/bin"
echo "== ruff"
"$BIN/ruff" check .
"$BIN/ruff" format --check .
echo "== mypy"
"$BIN/mypy"
echo "== pytest"
status=0
"$BIN/python" -m pytest -n "${PYTEST_WORKERS:-4}" "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$status"
