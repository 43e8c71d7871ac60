"""fastnorm.layer_norm and rms_norm are C objects (src/_core.c, RowsFunction) around their Python
functions: the common call runs in C, every other call goes to the wrapped Python function.

Both routes must give the same values (bit for bit where both can take a call), the same errors,
and the object must behave as the function it stands for: signature, docs, pickling, doctest."""

import copy
import doctest
import inspect
import pickle
import pydoc

import numpy as np
import pytest

import fastnorm
import fastnorm._functional
import reference as ref

FUNCTIONS = [fastnorm.layer_norm, fastnorm.rms_norm]
IDS = ["layer_norm", "rms_norm"]
TOL = {np.float32: 2e-6, np.float64: 1e-14}


def _reference_y(fn, x, w, b, eps):
    reference = ref.layer_norm if fn is fastnorm.layer_norm else ref.rms_norm
    return reference(x, w, b, eps=eps)[0]


@pytest.mark.parametrize("fn", FUNCTIONS, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(8, 768), (3, 5), (1, 1), (2, 3, 7), (5, 600), (4, 1025), (7,)])
def test_c_entry_gives_the_bits_of_the_python_function(fn, dtype, shape):
    """Every spelling the C entry takes: positional or keyword weight/bias, eps, out= (another array
    or x itself), axis=-1, mask=None, return_stats=False written out. The wrapped Python function
    (the general path) gives the same bits; both match the float64 reference."""
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 2.0 + 5.0).astype(dtype)
    w = rng.standard_normal(shape[-1]).astype(dtype)
    b = rng.standard_normal(shape[-1]).astype(dtype)
    x0 = x.copy()
    general = fn.__wrapped__
    calls = [
        ((x,), {}), ((x, w), {}), ((x, w, b), {}), ((x, None, b), {}),
        ((x,), {"weight": w, "bias": b}), ((x, w), {"bias": b, "eps": 0.25}),
        ((x, w, b), {"axis": -1, "mask": None, "return_stats": False, "eps": 1e-3}),
        ((x,), {"eps": 0.0}),
    ]
    for args, kwargs in calls:
        got = fn(*args, **kwargs)
        want = general(*args, **kwargs)
        assert type(got) is np.ndarray and got.dtype == dtype and got.shape == shape
        np.testing.assert_array_equal(got, want)
        kw = {"eps": kwargs.get("eps", 1e-5)}
        wb = list(args[1:]) + [None] * (3 - len(args))
        w_, b_ = kwargs.get("weight", wb[0]), kwargs.get("bias", wb[1])
        expected = _reference_y(fn, x0, w_, b_, **kw)
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(got - expected).max() <= 8 * TOL[dtype] * scale
    np.testing.assert_array_equal(x, x0)                    # nothing the caller passed is changed
    out = np.full_like(x, np.nan)
    assert fn(x, w, b, out=out) is out
    np.testing.assert_array_equal(out, general(x, w, b))
    xi = x.copy()
    assert fn(xi, w, b, out=xi) is xi                        # in place
    np.testing.assert_array_equal(xi, general(x, w, b))


@pytest.mark.parametrize("fn", FUNCTIONS, ids=IDS)
def test_calls_the_c_entry_passes_on_give_the_python_functions_results(fn):
    """Anything but the common call is the Python function's: other axes (also -1 spelled as a
    NumPy int or a tuple), masks, stats, int eps, float16, lists, strided and Fortran arrays,
    weights of another dtype. Same values as the general path and the reference."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 6, 10)).astype(np.float32)
    w = rng.standard_normal(10).astype(np.float32)
    general = fn.__wrapped__
    cases = [
        ((x, w), {"axis": np.int64(-1)}), ((x, w), {"axis": (-1,)}), ((x, w), {"axis": 2}),
        ((x, w), {"eps": 0}), ((x, w), {"return_stats": 0}), ((x, w), {"return_stats": True}),
        ((x, w), {"mask": np.array([[True] * 6] * 3 + [[True] * 5 + [False]])}),
        ((x.astype(np.float16), w.astype(np.float16)), {}), ((x.tolist(), w.tolist()), {}),
        ((x[:, ::2], w), {}), ((x[:, :, ::-1], w), {}), ((np.asfortranarray(x), w), {}),
        ((x, w.astype(np.float64)), {}), ((x, w[::-1]), {}), ((x.astype(">f4"), w), {}),
        ((x.astype(np.int64), None), {}), ((x,), {"out": np.empty((10, 6, 4), np.float32).T}),
        ((), {"x": x, "weight": w}),
    ]
    for args, kwargs in cases:
        got, want = fn(*args, **kwargs), general(*args, **kwargs)
        if isinstance(want, tuple):
            for g, v in zip(got, want):
                np.testing.assert_array_equal(g, v)
        else:
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
    y = fn(x[:, :, ::-1], w)
    expected = _reference_y(fn, x[:, :, ::-1], w, None, 1e-5)
    assert np.abs(y - expected).max() <= 8 * TOL[np.float32] * max(1.0, float(np.abs(expected).max()))


@pytest.mark.parametrize("fn", FUNCTIONS, ids=IDS)
def test_bad_calls_raise_what_the_python_function_raises(fn):
    """Too many or too few arguments, an argument given twice, unknown keywords, bad values: the
    same exception type and message as the Python function, never a crash."""
    x = np.ones((2, 4), np.float32)
    w = np.ones(4, np.float32)
    general = fn.__wrapped__
    bad = [
        ((), {}), ((x, w, w, w), {}), ((x, w), {"weight": w}), ((x,), {"wieght": w}),
        ((x,), {"x": x}), ((x, np.ones(3, np.float32)), {}), ((x,), {"eps": -1.0}),
        ((x,), {"eps": float("nan")}), ((x,), {"axis": -1.0}), ((x,), {"axis": 2**70}),
        ((x,), {"out": np.empty((2, 4), np.float32)[:, ::-1].copy().T}),
        ((x,), {"out": np.empty((2, 4), np.int32)}), ((x,), {"out": np.empty((2, 4))}), ((x,), {"out": "y"}),
        (("x",), {}), ((x.tolist(),), {"out": x}),
    ]
    for args, kwargs in bad:
        with pytest.raises(Exception) as want:
            general(*args, **kwargs)
        with pytest.raises(want.type) as got:
            fn(*args, **kwargs)
        assert str(got.value) == str(want.value)


@pytest.mark.parametrize("fn", FUNCTIONS, ids=IDS)
def test_the_c_entry_reads_the_thread_count_on_every_call(fn, monkeypatch):
    """set_num_threads takes effect on the next call; a thread count the C entry cannot use sends
    the call to the Python function (same bits either way)."""
    x = np.random.default_rng(3).standard_normal((4096, 64)).astype(np.float32)
    one = None
    for n in (1, 2, 3):
        monkeypatch.setattr(fastnorm._threads, "num_threads", n)
        y = fn(x)
        one = y if one is None else one
        np.testing.assert_array_equal(y, one)
    monkeypatch.setattr(fastnorm._threads, "num_threads", 2**80)
    with pytest.raises((OverflowError, ValueError, TypeError)):
        fn(x)                                              # the Python function refuses it
    monkeypatch.setattr(fastnorm._threads, "num_threads", 1)
    np.testing.assert_array_equal(fn(x), one)


@pytest.mark.parametrize("fn", FUNCTIONS, ids=IDS)
def test_the_object_stands_for_its_python_function(fn):
    """Signature, docs, names and defaults are the Python function's; help() shows them; pickle and
    copy give the object itself; as a class attribute it does not bind (as built-ins do)."""
    py = fn.__wrapped__
    assert inspect.isfunction(py) and callable(fn) and inspect.isroutine(fn)
    assert inspect.signature(fn) == inspect.signature(py)
    assert str(inspect.signature(fn)).startswith("(x, weight=None, bias=None, *, axis=-1, eps=1e-05")
    assert fn.__doc__ == py.__doc__ and "Examples" in fn.__doc__
    assert (fn.__name__, fn.__qualname__, fn.__module__) == (py.__name__, py.__qualname__, py.__module__)
    assert fn.__kwdefaults__ == py.__kwdefaults__ and fn.__defaults__ == py.__defaults__
    assert fn.__name__ in repr(fn)
    text = pydoc.render_doc(fn, renderer=pydoc.plaintext)
    assert fn.__name__ + str(inspect.signature(py)) in text and py.__doc__.splitlines()[0] in text
    assert pickle.loads(pickle.dumps(fn)) is fn
    assert copy.copy(fn) is fn and copy.deepcopy(fn) is fn
    assert getattr(fastnorm, fn.__name__) is fn is getattr(fastnorm._functional, fn.__name__)

    class Holder:
        f = fn

    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(Holder().f(x), fn(x))
    with pytest.raises(AttributeError):
        fn.no_such_attribute


def test_doctest_finds_the_examples_of_both():
    """doctest (tests/test_docstrings.py) runs the examples of the wrapped functions."""
    names = {t.name.rsplit(".", 1)[-1] for t in doctest.DocTestFinder().find(fastnorm._functional)
             if t.examples}
    assert {"layer_norm", "rms_norm"} <= names
