#!/usr/bin/env bash
# Run every check and the whole test suite (slow and reliability tests included) on a clean
# checkout. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if ! command -v redis-server >/dev/null; then
  echo "redis-server is needed by the tests (Debian: apt-get install redis-server)" >&2
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q redis-server >/dev/null
  else
    exit 1
  fi
fi
# index.html is checked in headless Chromium (tests/scheduler/test_index_html.py skips
# without it unless CAPVST_REQUIRE_CHROMIUM=1, as in CI)
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium for the index.html test" >&2
    apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
      || echo "chromium did not install" >&2
  else
    echo "chromium is missing: the index.html test is skipped (Debian: apt-get install chromium)" >&2
  fi
fi
. .venv/bin/activate
ruff check .
mypy
# the full-resolution runs (minutes each: `-m large`) only when asked for
if [ "$#" -eq 0 ]; then
  set -- -m "not large"
fi
python -m pytest "$@"
