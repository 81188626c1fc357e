#!/usr/bin/env bash
# The agent's main job on a local default: write a tiny demo model, show its memory check, then run the agent
# standalone on config/samples/ until Ctrl-C. In another terminal: `.venv/bin/metal-agent status`, and chat with
#   curl "$(.venv/bin/metal-agent status --endpoint default/tiny-llama)/v1/chat/completions" \
#        -d '{"messages":[{"role":"user","content":"hello"}],"max_tokens":16}'
source "$(dirname "$0")/_venv.sh"
python scripts/make_demo_model.py demo
echo
echo "== metal-agent estimate config/samples/tiny-model.yaml   (would it fit? nothing is started)"
metal-agent estimate config/samples/tiny-model.yaml
echo
echo "== metal-agent run --manifests config/samples --model-root demo   (Ctrl-C stops the agent and its servers)"
exec metal-agent run --manifests config/samples --model-root demo --state-dir .state "$@"
