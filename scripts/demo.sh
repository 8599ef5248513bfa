#!/usr/bin/env bash
# Installs the pinned runtime packages into .venv (first run only) and runs the main job on the built-in tiny
# random model (offline, seconds). Its output is meaningless random numbers: it proves the pipeline runs.
# Arguments go to the entry point, e.g. scripts/demo.sh --model_name /path/to/GLM-4.1V-9B-Thinking
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export GLOG_v=3
exec .venv/bin/python tools/smoke_forward.py "$@"
