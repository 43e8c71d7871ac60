"""The real data of the demos: scikit-learn's 8x8 handwritten digits, and the palette of their figures.

``sklearn.datasets.load_digits`` ships with scikit-learn (1,797 images of 8x8 pixels, values 0 to
16, ten classes), so the demos run offline. scikit-learn is optional (``pip install
"fastnorm-numpy[demos]"``); it is imported only when a demo asks for the digits.
"""
from __future__ import annotations

import functools

import numpy as np

class DataUnavailable(RuntimeError):
    """A demo needs the digits but scikit-learn is not installed."""


def require_sklearn() -> None:
    """Raise DataUnavailable with the install command when scikit-learn is missing."""
    try:
        import sklearn  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise DataUnavailable(
            "this demo trains on scikit-learn's handwritten digits, and scikit-learn is not installed; "
            "install it with pip install \"fastnorm-numpy[demos]\" (or pip install scikit-learn)") from None


@functools.lru_cache(maxsize=1)
def _load():
    require_sklearn()
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    digits = load_digits()
    images = digits.images.astype(np.float64)
    images.setflags(write=False)
    target = digits.target.astype(np.int64)
    target.setflags(write=False)
    return images, target


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: images (1797, 8, 8) float64 with values 0..16, and labels (1797,) 0..9 (copies)."""
    images, target = _load()
    return images.copy(), target.copy()


def digits_split(seed: int = 0, test_size: int = 450) -> dict:
    """A stratified train/test split of the flattened digits, standardized per pixel with the
    training set's mean and std (pixels constant in the training set become 0).

    Returns dict(x_train (n, 64), y_train, x_test (450, 64), y_test, mean, std).
    """
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    images, target = _load()
    x = images.reshape(len(images), -1)
    x_train, x_test, y_train, y_test = train_test_split(x, target, test_size=test_size, random_state=seed,
                                                        stratify=target)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    scale = np.where(std > 0, std, 1.0)
    return dict(x_train=(x_train - mean) / scale, y_train=y_train, x_test=(x_test - mean) / scale,
                y_test=y_test, mean=mean, std=std)
