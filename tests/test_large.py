"""Huge arrays (opt-in: ``FASTNORM_LARGE_TESTS=1``): more than 2**31 elements, and single rows,
columns and planes longer than 2**24 elements, checked against analytic results.

The data are periodic patterns of small integers, exact in float16/float32, so every row's (or
column's) mean and variance are known exactly without a second huge computation:

* ``x[r, k] = P[(k + r) % 7] + offset(r)`` with rows of D = 4095 = 7 * 585 elements: every row is a
  shifted copy of the pattern (mean ``offset + 9``, variance ``var(P)``) and its normalized values
  are ``Q[(k + r) % 7]`` (nonzero, so an unwritten output is caught); the phase depends on the row,
  so output written to the wrong row (e.g. by 32-bit index overflow) is caught too;
* the pattern of rows repeats every 77 rows and R is a multiple of 77, so each column's statistics
  are those of one 77-row block.

Needs ~9 GB of free memory for the > 2**31 element tests (4.3 GB float16 input + 4.3 GB output).
Each test prints its time and peak resident memory (run with ``-s`` to see them).
"""
import os
import threading
import time

import numpy as np
import pytest

import fastnorm

pytestmark = pytest.mark.skipif(os.environ.get("FASTNORM_LARGE_TESTS") != "1",
                                reason="huge arrays: set FASTNORM_LARGE_TESTS=1 to run")

P = np.array([0.0, 1, 2, 4, 8, 16, 32])          # mean 9, not in P: normalized values are all nonzero
PERIOD = len(P)
D = PERIOD * 585                                  # 4095 features per row
BLOCK_ROWS = 77                                   # the row pattern (phase % 7, offset % 11) repeats every 77 rows
EPS = 1e-5


def offsets(rows):
    return (np.arange(rows) % 11) * 100.0 - 500.0     # integers in [-500, 500]: exact in float16


def block64(rows=BLOCK_ROWS, d=D):
    """The (rows, d) float64 pattern block: P[(k + r) % 7] + offset(r)."""
    r = np.arange(rows)[:, None]
    k = np.arange(d)[None, :]
    return P[(k + r) % PERIOD] + offsets(rows)[:, None]


class Peak:
    """Wall time and peak resident memory of a block of code (RSS sampled every 20 ms)."""

    def __init__(self, label):
        self.label = label

    def _rss(self):
        try:
            with open(f"/proc/{os.getpid()}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.02)

    def __enter__(self):
        self.start_rss = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())
        print(f"\n[large] {self.label}: {self.seconds:.1f} s, peak RSS {self.peak / 2**30:.2f} GiB "
              f"(+{(self.peak - self.start_rss) / 2**30:.2f} GiB during the call)")


def max_abs_diff_chunked(y3, want_block, chunk=96):
    """max |y - want| over y3 (m, 77, D), want_block (77, D) broadcast along m; in float32 chunks."""
    w = want_block.astype(np.float32)
    worst = 0.0
    for i in range(0, y3.shape[0], chunk):
        part = y3[i:i + chunk].astype(np.float32)
        part -= w
        np.abs(part, out=part)
        worst = max(worst, float(part.max()))
        if not np.isfinite(worst):
            return np.inf
    return worst


@pytest.fixture(scope="class")
def huge_f16():
    """(R, D) float16 with R * D > 2**31 + 2**20: 4.3 GB."""
    m = -(-(2 ** 31 + 2 ** 20) // (BLOCK_ROWS * D)) + 0     # ceil
    x3 = np.empty((m, BLOCK_ROWS, D), dtype=np.float16)
    x3[...] = block64().astype(np.float16)                   # exact: small integers
    x = x3.reshape(m * BLOCK_ROWS, D)
    assert x.size > 2 ** 31
    yield x
    del x, x3


class TestMoreThan2To31Elements:
    """Both tests share one 4.3 GB input, freed when the class is done."""

    def test_layer_norm(self, huge_f16):
        _layer_norm_more_than_2_31_elements(huge_f16)

    def test_batch_norm(self, huge_f16):
        _batch_norm_more_than_2_31_elements(huge_f16)


def _layer_norm_more_than_2_31_elements(x):
    var_p = P.var()
    q = (P - P.mean()) / np.sqrt(var_p + EPS)
    r = np.arange(BLOCK_ROWS)[:, None]
    want = q[(np.arange(D)[None, :] + r) % PERIOD]          # (77, D): the same for every 77-row block
    with Peak(f"layer_norm float16 {x.shape} ({x.size} elements)"):
        y, mean, rstd = fastnorm.layer_norm(x, return_stats=True)
    assert y.shape == x.shape and y.dtype == np.float16
    err = max_abs_diff_chunked(y.reshape(-1, BLOCK_ROWS, D), want)
    assert err <= 2e-3, err                                  # float16 half-ulp at |q| <= 2.6 is 1e-3
    np.testing.assert_array_equal(mean, np.tile(offsets(BLOCK_ROWS) + P.mean(), x.shape[0] // BLOCK_ROWS)
                                  .astype(np.float32))
    np.testing.assert_allclose(rstd, 1 / np.sqrt(var_p + EPS), rtol=1e-7)
    # the last rows: written, and the right phase
    np.testing.assert_allclose(y[-BLOCK_ROWS:].astype(np.float64), want, atol=2e-3)
    del y


def _batch_norm_more_than_2_31_elements(x):
    blk = block64()
    mu, var = blk.mean(axis=0), blk.var(axis=0)               # every column repeats one block column
    want = (blk - mu) / np.sqrt(var + EPS)
    rm, rv = np.zeros(D), np.ones(D)
    with Peak(f"batch_norm float16 {x.shape} ({x.size} elements), training, running stats"):
        y, mean, rstd = fastnorm.batch_norm(x, running_mean=rm, running_var=rv, momentum=0.5, return_stats=True)
    assert y.shape == x.shape and y.dtype == np.float16
    np.testing.assert_allclose(mean, mu, rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(var + EPS), rtol=1e-6)
    n = x.shape[0]
    np.testing.assert_allclose(rm, 0.5 * mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rv, 0.5 + 0.5 * var * n / (n - 1), rtol=1e-12)
    err = max_abs_diff_chunked(y.reshape(-1, BLOCK_ROWS, D), want)
    assert err <= 4e-3, err                                  # |want| <= ~3.3
    del y


# --------------------------------------------------------------------------- one group > 2**24 elements

LONG = 14 * (2 ** 24 // 14 + 3)          # 16,777,258 > 2**24, a multiple of 14 (the masked pattern period)


def long_pattern(dtype, offset):
    """P[i % 7] + offset for i < LONG, and the exact mean/variance of the pattern."""
    v = np.tile((P + offset).astype(dtype), LONG // PERIOD)
    return v, P.mean() + offset, P.var()


@pytest.mark.parametrize("dtype,offset,tol", [(np.float32, 1000.0, 1e-5), (np.float16, 100.0, 2e-3),
                                              (np.float64, 1e6, 1e-12)])
def test_row_longer_than_2_24_layer_rms_instance_group(dtype, offset, tol):
    v, mean, var = long_pattern(dtype, offset)
    q = np.tile((P - P.mean()) / np.sqrt(var + EPS), LONG // PERIOD)
    label = f"{np.dtype(dtype).name} row of {LONG} elements"
    with Peak(f"layer_norm {label}"):
        y, m, r = fastnorm.layer_norm(v[None, :], return_stats=True)
    assert float(m[0]) == pytest.approx(mean, rel=1e-7) and float(r[0]) == pytest.approx(1 / np.sqrt(var + EPS), rel=1e-6)
    np.testing.assert_allclose(y[0].astype(np.float64), q, rtol=0, atol=tol * 3)

    ms = np.mean((P + offset) ** 2)
    with Peak(f"rms_norm {label}"):
        y, r = fastnorm.rms_norm(v[None, :], return_stats=True)
    assert float(r[0]) == pytest.approx(1 / np.sqrt(ms + EPS), rel=1e-6)
    np.testing.assert_allclose(y[0].astype(np.float64), np.tile((P + offset) / np.sqrt(ms + EPS), LONG // PERIOD),
                               rtol=0, atol=tol * 3)

    with Peak(f"instance_norm {label} as one (1, 1, n) plane"):
        y, m, r = fastnorm.instance_norm(v[None, None, :], axis=1, return_stats=True)
    assert float(m[0, 0]) == pytest.approx(mean, rel=1e-7)
    np.testing.assert_allclose(y[0, 0].astype(np.float64), q, rtol=0, atol=tol * 3)

    with Peak(f"group_norm {label} as 2 channels of 1 group, (1, 2, n/2)"):
        y, m, r = fastnorm.group_norm(v.reshape(1, 2, -1), 1, axis=1, return_stats=True)
    assert float(m[0, 0]) == pytest.approx(mean, rel=1e-7)
    np.testing.assert_allclose(y.reshape(-1).astype(np.float64), q, rtol=0, atol=tol * 3)


def test_row_longer_than_2_24_backward():
    """layer_norm_backward of a long float32 row: with dy = 1, dx = 0 and dbias = 1; with dy = y,
    dx = rstd * (y - y * mean(y*y)) analytically ~ y * rstd * eps/(var+eps)."""
    v, mean, var = long_pattern(np.float32, 1000.0)
    x = v[None, :]
    y, m, r = fastnorm.layer_norm(x, return_stats=True)
    with Peak(f"layer_norm_backward float32 row of {LONG}"):
        dx, dw, db = fastnorm.layer_norm_backward(np.ones_like(x), x, m, r)
    assert np.abs(dx).max() < 1e-6
    assert (db == 1).all()
    q = (P - P.mean()) / np.sqrt(var + EPS)
    np.testing.assert_allclose(dw[:PERIOD], q, rtol=1e-5, atol=1e-5)


def test_column_longer_than_2_24_batch_norm_with_mask():
    v, mean, var = long_pattern(np.float32, 1000.0)
    x = v[:, None]                                             # (LONG, 1): one feature, LONG values
    q = np.tile((P - P.mean()) / np.sqrt(var + EPS), LONG // PERIOD)
    with Peak(f"batch_norm float32 column of {LONG}"):
        y, m, r = fastnorm.batch_norm(x, return_stats=True)
    assert float(m[0]) == pytest.approx(mean, rel=1e-7)
    np.testing.assert_allclose(y[:, 0], q, rtol=0, atol=3e-5)
    mask = np.arange(LONG) % 2 == 0                            # even i: every residue mod 7 equally often
    with Peak(f"batch_norm float32 column of {LONG}, masked"):
        y, m, r = fastnorm.batch_norm(x, mask=mask, return_stats=True)
    assert float(m[0]) == pytest.approx(mean, rel=1e-7)
    assert float(r[0]) == pytest.approx(1 / np.sqrt(var + EPS), rel=1e-6)
    np.testing.assert_allclose(y[mask, 0], q[mask], rtol=0, atol=3e-5)
    assert (y[~mask] == 0).all()
