from __future__ import annotations

import pytest
import torch

from latentdiag.testing import LinearGaussianModel


@pytest.fixture(scope="session")
def exact_model() -> LinearGaussianModel:
    return LinearGaussianModel.random(10, 4, noise_std=0.5, seed=0)


@pytest.fixture(scope="session")
def wrong_model() -> LinearGaussianModel:
    """Same generative model, a deliberately wrong posterior (mean-field, shifted, too narrow)."""
    return LinearGaussianModel.random(10, 4, noise_std=0.5, seed=0, posterior="mean_field", posterior_shift=0.3,
                                      posterior_scale=0.8)


@pytest.fixture(scope="session")
def x_model(exact_model) -> torch.Tensor:
    return exact_model.sample(300, torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread (torch and the BLAS under scipy / scikit-learn) avoids OpenMP stalls when the
    tests share a busy 2-core machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import importlib

    for module in ("scipy.linalg", "sklearn.decomposition", "sklearn.svm"):
        importlib.import_module(module)  # threadpoolctl limits only libraries already loaded
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)
