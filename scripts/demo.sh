#!/usr/bin/env bash
# The agent's main job on a local default: write a tiny demo model and check it against this machine's budget.
source "$(dirname "$0")/_venv.sh"
python scripts/make_demo_model.py demo
echo
echo "== metal-agent estimate config/samples/tiny-model.yaml   (the sample Model and InferenceService)"
metal-agent estimate config/samples/tiny-model.yaml
echo
echo "== the same model at a 32k context in a 128Mi budget: does not fit (exit status 1), and says what would"
status=0
metal-agent estimate demo/tiny-llama.gguf --ctx-size 32768 --memory-budget 128Mi || status=$?
[ "$status" -eq 1 ]
