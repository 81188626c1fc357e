#!/usr/bin/env bash
# The whole check: lint, types, tests. Sets up .venv on first use.
source "$(dirname "$0")/_venv.sh"
echo "== ruff"; ruff check agent plugins tests scripts; ruff format --check agent plugins tests scripts
echo "== mypy"; mypy
echo "== import layers"; lint-imports
echo "== pytest"; python -m pytest "$@"
