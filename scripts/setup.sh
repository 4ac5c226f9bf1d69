#!/usr/bin/env bash
# Idempotent setup on Debian/Ubuntu: the Debian packages the demo and tests run
# (Mosquitto, InfluxDB 1.x, VictoriaMetrics; for the tests also Prometheus,
# systemd-analyze and python3-apt) and a virtualenv with this project.
#
#   scripts/setup.sh [run|dev]     run: the project only; dev: also the test tools
#
# A second run installs nothing: packages are checked with dpkg, and the venv is
# reinstalled only when pyproject.toml (or the extras asked for) changed.
# Sourced by scripts/demo.sh and scripts/test.sh; VENV overrides the venv path.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
EXTRAS="${1:-run}"
PYTHON="${PYTHON:-python3}"

say() { printf 'setup: %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { say "run as root or install sudo"; exit 1; }
  SUDO="sudo"
fi

if ! command -v "$PYTHON" >/dev/null; then
  say "$PYTHON not found"
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "Python >= 3.11 is needed, $PYTHON is $("$PYTHON" -V 2>&1)"
  exit 1
fi

packages=(mosquitto influxdb victoria-metrics)
# The tests also run the operators' tools: promtool and Prometheus, systemd-analyze,
# Chromium (headless, for the fleet report),
# Ansible's apt module (python3-apt, for the system's Python), what the
# playbook test installs (so that it finds it installed), the clients that
# docs/devices.md's recipes use (mosquitto_pub, curl), and socat (a serial line
# for the Modbus RTU test), libfaketime (an agent whose clock is wrong,
# tests/edge_agent/test_clocks.py) and Java 17 (Spark, for the lake jobs' tests on
# --engine spark).
if [ "$EXTRAS" = dev ]; then
  packages+=(prometheus systemd python3-apt python3-venv mosquitto-clients influxdb-client
    curl socat chromium faketime openjdk-17-jre-headless)
fi
# Debian's python3 needs python3-venv for `python3 -m venv` (ensurepip).
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -q
  # The demo and the tests start their own servers on free loopback ports; keep the
  # packages' system services from starting during the install (policy-rc.d, only if
  # the machine has none of its own).
  policy_made=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    policy_made=1
  fi
  status=0
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${missing[@]}" || status=$?
  [ -n "$policy_made" ] && $SUDO rm -f /usr/sbin/policy-rc.d
  [ "$status" -eq 0 ] || exit "$status"
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
case "$EXTRAS" in
  run) spec=".[edge,cloud]" ;;  # the demo runs both sides
  dev) spec=".[dev]" ;;
  *) say "unknown extras '$EXTRAS' (run or dev)"; exit 2 ;;
esac
stamp="$VENV/.setup-stamp-$EXTRAS"
want="$(sha256sum < "$ROOT/pyproject.toml" | cut -d" " -f1) $("$VENV/bin/python" -V 2>&1)"
current() { [ -f "$1" ] && [ "$(cat "$1")" = "$want" ]; }
# A dev install includes everything a run install has.
if ! current "$stamp" && ! { [ "$EXTRAS" = run ] && current "$VENV/.setup-stamp-dev"; }; then
  say "installing the project into $VENV ($EXTRAS)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  (cd "$ROOT" && "$VENV/bin/python" -m pip install -q -e "$spec")
  printf '%s' "$want" > "$stamp"
fi
