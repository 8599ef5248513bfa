#!/usr/bin/env bash
# Installs the pinned runtime packages into .venv (or $GLM4V_VENV, see setup_env.sh; first run only) and runs the main job: generate.py on the
# built-in tiny *random* model with a generated test image (offline, seconds). Its answer is random text: it proves
# the whole pipeline (processor, vision tower, decoder, KV cache, sampling, thinking control, streaming) runs.
# Arguments go to generate.py, e.g.: scripts/demo.sh --model_name /models/GLM-4.1V-9B-Thinking --image a.jpg --prompt "..."
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
venv=${GLM4V_VENV:-.venv}
export GLOG_v=3
if [ $# -eq 0 ]; then
  img=$("$venv/bin/python" tools/make_demo_image.py)
  # --demo: the random model's EOS is ignored and its reply opens with <think> (said in the output), so all 64 tokens
  # stream through the thinking / answer split. MindSpore's compile cache makes later runs skip the graph compiles
  # (~1 s instead of ~15 s); MindSpore checks only the entry script for changes, so the cache folder is keyed on
  # every source file and pin. Used for this tiny demo only.
  key=$(find glm4v_ms -name '*.py' | LC_ALL=C sort | xargs cat generate.py requirements.txt constraints.txt | sha1sum | cut -c1-12)
  export MS_COMPILER_CACHE_ENABLE=1 MS_COMPILER_CACHE_PATH="$HOME/.cache/glm4v_ms/compile-cache-$key"
  set -- --model_name tiny-random --image "$img" --prompt "What is in this picture?" --max_new_tokens 64 --demo
fi
exec "$venv/bin/python" generate.py "$@"
