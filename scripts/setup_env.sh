#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs the pinned packages into it.
#   scripts/setup_env.sh          runtime packages (requirements.txt)
#   scripts/setup_env.sh --dev    runtime + test/reference packages (requirements-dev.txt: torch CPU, pytest)
# The environment is .venv next to the checkout, or the folder in $GLM4V_VENV (absolute, or relative to the
# checkout): CI uses a second one that holds the runtime set only, to run the main job as a new user does.
# Every install goes through constraints.txt, so nothing can lift numpy to 2.x (MindSpore 2.10 needs numpy 1.x).
# Re-running is cheap: pip only checks that the pins are satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
py=${PYTHON:-python3}
venv=${GLM4V_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
stamp_of() { echo "$venv/.installed-$(cat "$1" requirements.txt constraints.txt | sha1sum | cut -c1-12)"; }
stamp=$(stamp_of "$req")
# The dev set contains the runtime set: a current dev install satisfies a runtime request.
if [ ! -f "$stamp" ] && ! { [ "$req" = requirements.txt ] && [ -f "$(stamp_of requirements-dev.txt)" ]; }; then
  echo "[setup] installing $req into $venv (first time only; ~80 s and ~4 GB with the test packages)" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" -c constraints.txt >&2
  "$venv/bin/python" -c "import numpy, sys; sys.exit(0 if numpy.__version__.startswith('1.') else 'numpy 2.x got installed: MindSpore 2.10 needs numpy 1.x')"
  touch "$stamp"
fi
