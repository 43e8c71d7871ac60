#!/usr/bin/env bash
# Install the manylinux wheel from dist/ (scripts/build_dist.sh) into a fresh venv where no C
# compiler can be found, and run the test suite against it: the tests, examples and docs come
# from the unpacked sdist in dist/, so this also checks that the sdist carries what the tests need.
#   bash scripts/test_wheel.sh [PYTHON] [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
shift || true
wheel=$(ls "$PWD"/dist/*manylinux*.whl)
sdist=$(ls "$PWD"/dist/*.tar.gz)
work=$(mktemp -d)
rm=$(command -v rm)                       # PATH is narrowed below
trap '"$rm" -rf "$work"' EXIT
"$py" -m venv "$work/venv"
tar -xzf "$sdist" -C "$work"
src=$(ls -d "$work"/fastnorm_numpy-*/)
# No compiler: CC/CXX fail, and PATH holds the venv alone (gcc and cc live in /usr/bin).
export CC=false CXX=false PATH="$work/venv/bin"
pip install -q --only-binary=:all: "$wheel[test]"
cd "$src"
python -c "import fastnorm, sys; assert '/site-packages/' in fastnorm.__file__, fastnorm.__file__; \
print('fastnorm', fastnorm.__version__, 'from', fastnorm.__file__)"
if python -c "import shutil, sys; sys.exit(shutil.which('cc') is None and shutil.which('gcc') is None)"; then
    echo "test_wheel.sh: a C compiler is still on PATH" >&2
    exit 1
fi
python -m pytest -q -p no:cacheprovider "$@"
