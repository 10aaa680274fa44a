#!/usr/bin/env bash
# Create .venv (once) and install the project with its pinned dependencies, test tools and the lm-eval extra
# (its tests run in CI). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,lm-eval]"
