#!/usr/bin/env bash
# Run the tests from a fresh clone: installs what they need (see scripts/setup.sh: the same .venv
# the quickstart uses, or the active environment), then ruff and pytest. Arguments go to pytest:
#
#   bash scripts/test.sh                       # everything, as CI runs it
#   bash scripts/test.sh -m "not slow"         # the fast tier (no corpus, no subprocesses)
#   bash scripts/test.sh tests/layers -k lrn   # a part
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
setup_system_packages test
setup_python test
ruff check .
python -m pytest "$@"
