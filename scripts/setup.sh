#!/usr/bin/env bash
# Create .venv and install raypack with its pinned dependencies (constraints.txt).
# Idempotent: re-runs only when pyproject.toml or constraints.txt changed.
#     bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then
  exit 0
fi
python=$(command -v python3.11 || command -v python3)
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), "raypack needs Python 3.11, found " + sys.version' 
[ -x .venv/bin/python ] || "$python" -m venv .venv
echo "installing raypack and its pinned dependencies into .venv (first time: a few minutes)"
# This machine's pip config names local index folders that may not exist; their warnings are noise.
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]' 2>&1 \
  | { grep -v "^WARNING: Location 'file:" || true; }
touch "$stamp"
