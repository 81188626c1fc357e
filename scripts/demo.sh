#!/usr/bin/env bash
# The agent's main job on a local default: write a tiny demo model and check it against this machine's budget.
source "$(dirname "$0")/_venv.sh"
python scripts/make_demo_model.py demo
echo "== metal-agent estimate config/samples/tiny-model.yaml"
metal-agent estimate config/samples/tiny-model.yaml
