#!/usr/bin/env bash
# Installs the pinned runtime packages into .venv (or $GLM4V_VENV, see setup_env.sh; first run only) and runs the main job: generate.py on the
# built-in tiny *random* model with a generated test image (offline, seconds). Its answer is random text: it proves
# the whole pipeline (processor, vision tower, decoder, KV cache, sampling, streaming) runs.
# Arguments go to generate.py, e.g.: scripts/demo.sh --model_name /models/GLM-4.1V-9B-Thinking --image a.jpg --prompt "..."
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
venv=${GLM4V_VENV:-.venv}
export GLOG_v=3
if [ $# -eq 0 ]; then
  img=$("$venv/bin/python" tools/make_demo_image.py)
  set -- --model_name tiny-random --image "$img" --prompt "What is in this picture?" --max_new_tokens 64
fi
exec "$venv/bin/python" generate.py "$@"
