#!/usr/bin/env bash
# Type checks: mypy over the package's code (python/fastnorm, with its stubs) and stubtest, which
# compares the stubs (__init__.pyi, _core.pyi) with the installed fastnorm at run time.
#   bash scripts/typecheck.sh [PYTHON]     PYTHON: an interpreter with fastnorm and mypy installed
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(realpath -s "${1:-.venv/bin/python}")
"$py" -m mypy --cache-dir=/dev/null python/fastnorm
# From outside the source tree, so that the installed fastnorm (with its extension) is the one checked.
root=$PWD
(cd / && "$py" -m mypy.stubtest fastnorm \
    --allowlist "$root/scripts/stubtest_allowlist.txt")
