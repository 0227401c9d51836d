#!/usr/bin/env bash
# Set up everything the test suite needs, then run it (what CI runs): the virtualenv
# (scripts/setup.sh) and Debian's Chromium for the dashboard's browser tests (installed with
# apt-get when missing; Playwright drives it, no browser download). Extra arguments go to
# pytest, e.g. `bash scripts/test.sh -k resume`. The service tests also need PostgreSQL on
# 127.0.0.1:5432 and Redis on 127.0.0.1:6379 (see the README's Development section).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${OPSD_VENV:-.venv}/bin/activate"

have_chromium() {
    [ -n "${OPSD_TEST_CHROMIUM:-}" ] && [ -x "${OPSD_TEST_CHROMIUM}" ] && return 0
    [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1
}

if ! have_chromium; then
    echo "scripts/test.sh: installing Debian's chromium for the dashboard tests (apt-get)" >&2
    as_root=()
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then
        as_root=(sudo -n)
    fi
    if { [ "$(id -u)" = 0 ] || [ ${#as_root[@]} -gt 0 ]; } \
        && "${as_root[@]}" apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq chromium >/dev/null; then
        echo "scripts/test.sh: chromium installed" >&2
    else
        echo "scripts/test.sh: could not install chromium (needs root or sudo and Debian's" \
            "package lists); the dashboard tests will fail: install it with" \
            "'apt-get install -y chromium' or point OPSD_TEST_CHROMIUM at a Chromium" >&2
    fi
fi

# Two pytest-xdist workers by default (OPSD_TEST_WORKERS=0 runs in one process): most tests wait
# on servers, subprocesses and jobs; each worker gets its own Redis databases and server ports,
# and a test file's tests stay on one worker (their module-scoped services are started once).
WORKERS="${OPSD_TEST_WORKERS:-2}"
if [ "$WORKERS" = 0 ]; then
    python -m pytest "$@"
else
    python -m pytest -n "$WORKERS" --dist loadfile "$@"
fi
