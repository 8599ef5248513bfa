#!/usr/bin/env bash
# Installs the pinned runtime + test packages into .venv (first run only) and runs the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k parity
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GLOG_v=3
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
