#!/usr/bin/env bash
# One entry point for a fresh machine: builds ./.venv (idempotent), then runs the demo or the test suite.
#   bash scripts/dev.sh demo [verl-tor demo flags...]   # the main job: ToR on a built-in tiny model, on CPU
#   bash scripts/dev.sh test [pytest args...]           # the test suite (what .ci/run runs)
set -euo pipefail

CALLER_DIR="$PWD"   # the demo's relative paths (--out-dir) mean what they mean where the user typed them
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VERL_TOR_VENV:-$ROOT/.venv}"
[[ "$VENV" == /* ]] || VENV="$ROOT/$VENV"   # absolute: the demo runs it from the caller's folder
PY="${PYTHON:-python3}"

ensure_venv() {
  # Re-install only when the package definition or the pins change (stamp = hash of both).
  local stamp="$VENV/.verl_tor_stamp" want
  want="$(cat setup.cfg pyproject.toml constraints/cpu.txt | sha256sum | cut -d' ' -f1)"
  if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return
  fi
  echo "[dev.sh] installing into $VENV (first run takes ~2 min)" >&2
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints/cpu.txt -e ".[test]"
  echo "$want" > "$stamp"
}

ensure_system_tools() {
  # Tests drive real tools: headless Chromium renders the token map, shellcheck lints the recipes.
  local missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
  [[ ${#missing[@]} -eq 0 ]] && return
  if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[dev.sh] installing ${missing[*]} (Debian packages)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "[dev.sh] WARNING: could not install ${missing[*]}; the tests that need them will fail" >&2
  else
    echo "[dev.sh] WARNING: ${missing[*]} missing and not root; the tests that need them will fail" >&2
  fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
  demo)
    ensure_venv
    cd "$CALLER_DIR"
    exec "$VENV/bin/verl-tor" demo "$@"
    ;;
  test)
    ensure_venv
    ensure_system_tools
    set +e
    # Two xdist workers (VERL_TOR_TEST_WORKERS; 0 runs in-process): a main_ppo run's start-up (Ray, then one worker
    # process after another importing torch and verl) mostly keeps one core busy, so two overlap on 2 cores. Whole
    # modules go to a worker (loadscope), so the runs a module's tests share are made once, in collection order
    # (--no-loadscope-reorder: tests/conftest.py puts the long loop modules first; xdist would put them last).
    "$VENV/bin/python" -m pytest -n "${VERL_TOR_TEST_WORKERS:-2}" --dist loadscope --no-loadscope-reorder "$@"
    rc=$?
    set -e
    # pytest exits 5 when it collected no test: that is a broken suite, not a pass.
    if [[ $rc -eq 5 ]]; then
      echo "[dev.sh] pytest collected no tests: failing" >&2
      exit 1
    fi
    exit $rc
    ;;
  *)
    echo "usage: bash scripts/dev.sh {demo|test} [args...]" >&2
    exit 2
    ;;
esac
