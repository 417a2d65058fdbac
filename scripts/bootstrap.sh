#!/usr/bin/env bash
# Create ./.venv and install capvst with its test tools, from this repository's own files.
# PyTorch comes first, pinned to a release (CAPVST_TORCH, default torch==2.13.0) when none is
# installed, so that pip does not pull an unexpected build; GPU users may install their own
# torch>=2.2 beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CAPVST_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.capvst-installed"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "import capvst, torch" 2>/dev/null; then
  exit 0
fi
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "installing ${CAPVST_TORCH:-torch==2.13.0} ..." >&2
  "$py" -m pip install -q --disable-pip-version-check "${CAPVST_TORCH:-torch==2.13.0}" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  "$py" -W ignore -c "import torch" 2>/dev/null || { echo "PyTorch did not install" >&2; exit 1; }
fi
echo "installing capvst and its dependencies ..." >&2
"$py" -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
"$py" -c "import capvst, scheduler, worker" || { echo "capvst did not install" >&2; exit 1; }
echo "$want" > "$stamp"
