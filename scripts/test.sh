#!/usr/bin/env bash
# Sets up .venv (see setup.sh) and runs the test suite. With CI=true: 200 hypothesis examples a
# property and the `slow` tests skipped. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
exec python -m pytest -n 2 -q "$@"
