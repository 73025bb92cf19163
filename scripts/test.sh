#!/usr/bin/env bash
# Run the tests from a fresh clone: installs what they need (see scripts/setup.sh: the same .venv
# the quickstart uses, or the active environment), then ruff and pytest. Arguments go to pytest:
#
#   bash scripts/test.sh                       # everything (about 2 minutes on 2 cores)
#   bash scripts/test.sh tests/layers -k lrn   # a part
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
setup_system_packages test
setup_python test
ruff check .
python -m pytest "$@"
