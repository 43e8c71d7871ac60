#!/usr/bin/env bash
# Build fastnorm with AddressSanitizer + UndefinedBehaviorSanitizer in a throwaway copy of the
# repository (its own venv and build directory; the repository's .venv is not touched), run the
# test suite under it, and fail if any sanitizer report appears.
#
#   scripts/sanitize.sh                     # the whole suite except the executed notebook
#   scripts/sanitize.sh -k layer_norm       # extra arguments go to pytest
#
# Environment:
#   SANITIZE_DIR=DIR        work in DIR (kept afterwards) instead of a temporary directory
#   SANITIZE_NO_CLONES=1    build with -DFASTNORM_NO_CLONES (no GCC target_clones / ifunc)
#   SANITIZE_NOTEBOOK=1     also run the notebook test (installs jupyter bits; slow under ASan)
#   SANITIZE_KEEP_GOING=1   report every error and go on (-fsanitize-recover=all, halt_on_error=0)
#                           instead of stopping at the first one; still fails if any was reported
#   PYTHON=python3          the interpreter the venv is made from
#   CC=gcc                  the compiler: GCC (the ASan runtime is `$CC -print-file-name=libasan.so`)
#
# Steps: copy the working tree (tracked + untracked, not ignored files), make a venv, install
# numpy/pytest/hypothesis from PyPI, build the extension with -fsanitize=address,undefined, then
#   1. the C-only kernel test (tests/c/test_kernels.c) as a fully instrumented executable,
#      with LeakSanitizer on (the kernels must free everything they allocate);
#   2. pytest with the ASan runtime preloaded into the (uninstrumented) interpreter.
# ASan reports are written to $WORK/reports/ (log_path, so reports of subprocesses are kept too);
# UBSan's runtime ignores log_path when loaded next to ASan, so pytest runs with --capture=sys
# (C-level stderr is not captured and lost when a process halts) and its output is searched for
# reports. Any report fails the run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
CC=${CC:-gcc}
export CC

if [[ -n "${SANITIZE_DIR:-}" ]]; then
    WORK=$SANITIZE_DIR
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastnorm-sanitize.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
fi
REPO=$WORK/repo
VENV=$WORK/venv
REPORTS=$WORK/reports
rm -rf "$REPO" "$REPORTS"
mkdir -p "$REPO" "$REPORTS"
start=$(date +%s)

log() { printf '\n== %s\n' "$*"; }

# ---- 1. a copy of the working tree --------------------------------------------------------------
log "copying $ROOT -> $REPO"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # tracked files (as they are in the working tree) and new, not ignored ones
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [[ -f "$f" ]] && printf '%s\0' "$f"; done |
        tar --null -T - -cf -) | tar -xf - -C "$REPO"
else
    (cd "$ROOT" && tar --exclude=./.venv --exclude=./build --exclude='*.so' --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=.hypothesis --exclude=.pytest_cache -cf - .) | tar -xf - -C "$REPO"
fi

# ---- 2. the venv ----------------------------------------------------------------------------------
log "venv $VENV"
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "setuptools>=77" wheel "numpy>=2.1" pytest hypothesis ml_dtypes
if [[ "${SANITIZE_NOTEBOOK:-0}" == 1 ]]; then
    "${PIP[@]}" install nbclient nbformat ipykernel matplotlib
fi

# ---- 3. the sanitized build ---------------------------------------------------------------------
SAN_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g"
HALT=1
if [[ "${SANITIZE_KEEP_GOING:-0}" == 1 ]]; then
    SAN_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fsanitize-recover=all -g"
    HALT=0
fi
EXTRA_DEFS=""
if [[ "${SANITIZE_NO_CLONES:-0}" == 1 ]]; then
    EXTRA_DEFS="-DFASTNORM_NO_CLONES"
fi
log "building with $SAN_FLAGS $EXTRA_DEFS ($($CC --version | head -1))"
(
    cd "$REPO"
    rm -rf build python/fastnorm/*.so
    CFLAGS="$SAN_FLAGS $EXTRA_DEFS" LDFLAGS="-fsanitize=address,undefined" \
        "${PIP[@]}" install --no-build-isolation --no-deps --force-reinstall .
)
# (no `cmd | grep -q` under pipefail: grep's early exit can kill cmd with SIGPIPE and fail the test)
SO=$(find "$VENV" -path '*/fastnorm/_core*.so' -print -quit)
if [[ -z "$SO" || "$(ldd "$SO")" != *libasan* ]]; then
    echo "error: $SO is not linked against the ASan runtime" >&2
    exit 2
fi
echo "extension: $SO"

# The interpreter itself is not instrumented: preload the ASan runtime (it must come first).
ASAN_RT=$($CC -print-file-name=libasan.so)
if [[ ! -e "$ASAN_RT" ]]; then
    echo "error: $CC has no libasan.so ($ASAN_RT)" >&2
    exit 2
fi

# ---- 4. the C kernel test, fully instrumented, with leak detection ------------------------------
log "C kernel test (tests/c/test_kernels.c) under ASan+UBSan+LSan"
"$CC" -std=c11 -O1 $SAN_FLAGS $EXTRA_DEFS -fopenmp-simd -pthread -I"$REPO/src" \
    "$REPO/tests/c/test_kernels.c" "$REPO"/src/{convert,vector,parallel,group_norm,batch_norm}.c -lm \
    -o "$WORK/test_kernels"
c_status=0
ASAN_OPTIONS="detect_leaks=1:halt_on_error=$HALT:log_path=$REPORTS/c-asan" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=$HALT" \
    "$WORK/test_kernels" > "$WORK/c-test.log" 2>&1 || c_status=$?
tail -3 "$WORK/c-test.log"

# ---- 5. the test suite ------------------------------------------------------------------------------
log "pytest under ASan+UBSan"
deselect=()
if [[ "${SANITIZE_NOTEBOOK:-0}" != 1 ]]; then
    # the notebook test starts a Jupyter kernel; it is skipped anyway without nbclient
    deselect=(--deselect tests/test_demos.py::test_notebook_runs)
fi
py_start=$(date +%s)
set +e
(
    cd "$REPO"
    # The .so is the installed, sanitized one; make sure no stray in-tree build shadows it.
    rm -f python/fastnorm/*.so
    # detect_leaks=0: CPython keeps its objects alive at exit by design.
    # PYTHONMALLOC=malloc: Python objects get ASan redzones too, not only NumPy buffers.
    env LD_PRELOAD="$ASAN_RT" \
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=$HALT:detect_stack_use_after_return=1:log_path=$REPORTS/asan" \
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=$HALT" \
        PYTHONMALLOC=malloc PYTHONFAULTHANDLER=1 \
        "$VENV/bin/python" -m pytest -v -p no:cacheprovider --capture=sys "${deselect[@]}" "$@"
) 2>&1 | tee "$WORK/pytest.log" | grep -Ev ' (PASSED|SKIPPED|XFAIL|XPASS)( \(.*\))? +\[ *[0-9]+%\]$'
py_status=${PIPESTATUS[0]}
set -e
end=$(date +%s)

# ---- 6. verdict ------------------------------------------------------------------------------------
log "summary"
echo "C kernel test exit status: $c_status"
echo "pytest exit status: $py_status ($((end - py_start)) s; total $((end - start)) s)"
grep -E '^=* ?[0-9]+ (passed|failed).* in [0-9.]+s' "$WORK/pytest.log" | tail -1 || true
tests=$(grep -cE '^tests/.*::.* (PASSED|FAILED|SKIPPED|XFAIL|XPASS|ERROR)' "$WORK/pytest.log" || true)
echo "tests that finished: $tests"
last=$(grep -E '^tests/.*::' "$WORK/pytest.log" | tail -1 || true)
if [[ -n "$last" && ! "$last" =~ (PASSED|FAILED|SKIPPED|XFAIL|XPASS|ERROR) ]]; then
    echo "the run stopped inside: ${last%% *}"
fi
PATTERN='runtime error:|ERROR: (Address|Leak|UndefinedBehavior)Sanitizer|WARNING: AddressSanitizer|SUMMARY: [A-Za-z]+Sanitizer'
reports=$(find "$REPORTS" -type f | sort)
found=0
if [[ -n "$reports" ]]; then
    echo "SANITIZER REPORTS (files):"
    for f in $reports; do
        echo "---- $f"
        cat "$f"
    done
    found=1
fi
for f in "$WORK/c-test.log" "$WORK/pytest.log"; do
    if grep -Eq "$PATTERN" "$f"; then
        echo "SANITIZER REPORTS in $f:"
        # one line per distinct report: UBSan file:line:col and message, ASan/LSan error line
        grep -oE "[^ .][^ ]*:[0-9]+:[0-9]+: runtime error: .*|(ERROR|WARNING): [A-Za-z]+Sanitizer: .*" "$f" |
            sed -E 's/0x[0-9a-f]+/0x.../g' | sort | uniq -c | head -50 || true
        found=1
    fi
done
if [[ $found == 1 ]]; then
    echo "FAILED: sanitizer reports above (full logs in $WORK; set SANITIZE_DIR to keep them)"
    exit 1
fi
echo "no sanitizer reports"
if [[ $c_status -ne 0 || $py_status -ne 0 ]]; then
    exit 1
fi
