#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with everything the server,
# the load test and the test suite need. Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

# promtool (Debian's prometheus package) checks the alert rules in tests/deploy/test_deploy.py.
if ! command -v promtool >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
        || echo "bootstrap: could not install promtool; the alert-rule tests will fail" >&2
fi

# Debian's chromium: the web page's tests (tests/browser/test_webpage.py) drive it headless with Playwright
# (Playwright's own browser download is not used).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
        || echo "bootstrap: could not install chromium; the web page's browser tests will fail" >&2
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
fi
stamp="$VENV/.installed-$(cat pyproject.toml scripts/bootstrap.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    # torch first, pinned: 2.13.0 is a local CPU wheel on these machines; an unpinned torch
    # (asked for by transformers/diffusers) would download a multi-GB CUDA build.
    # On a GPU host set TORCH_SPEC (for example "torch==2.13.0 --index-url .../cu128").
    "$VENV/bin/pip" install --quiet ${TORCH_SPEC:-torch==2.13.0}
    "$VENV/bin/pip" install --quiet -e ".[server,loadtest,dev]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
