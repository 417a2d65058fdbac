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
. .venv/bin/activate
ruff check .
mypy
python -m pytest "$@"
