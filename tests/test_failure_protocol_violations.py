"""Issue 15, class 6: protocol violations that used to give silent numbers (a negative posterior scale built with
validate_args=False, a prior with a batch shape, num_dims <= 0) raise ProtocolViolationError naming the capability
and the value or shape seen, in check_model and in the estimators' own checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

import latentdiag as ld
from latentdiag.errors import ExitCode, ProtocolViolationError
from latentdiag.report import run_report
from latentdiag.testing import LinearGaussianModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inner() -> LinearGaussianModel:
    return LinearGaussianModel.random(6, 2, seed=0, posterior="mean_field")


@pytest.fixture(scope="module")
def x(inner) -> torch.Tensor:
    return inner.sample(64, torch.Generator().manual_seed(0))


class _Wrap(torch.nn.Module):
    def __init__(self, inner, *, scale=None, prior=None, num_dims=None):
        super().__init__()
        self.inner, self._scale, self._prior, self._num_dims = inner, scale, prior, num_dims

    def encode(self, x):
        q = self.inner.encode(x)
        if self._scale is None:
            return q
        scale = self._scale(q.base_dist.scale)
        return Independent(Normal(q.base_dist.loc, scale, validate_args=False), 1, validate_args=False)

    def prior(self):
        return self.inner.prior() if self._prior is None else self._prior()

    def log_likelihood(self, x, z):
        return self.inner.log_likelihood(x, z)


class _WithDims(_Wrap):
    def num_dims(self, x):
        return self._num_dims(x)


def _negative_at(row, col, value=-0.3):
    def fn(scale):
        scale = scale.clone()
        scale[row, col] = value
        return scale
    return fn


@pytest.mark.parametrize("value,word", [(-0.3, "-0.3"), (0.0, "scale 0 "), (math.nan, "nan")])
def test_bad_posterior_scale_is_named_by_the_estimators(inner, x, value, word):
    model = _Wrap(inner, scale=_negative_at(5, 1, value))
    for run in (lambda: ld.rate(model, x), lambda: ld.encode(model, x), lambda: ld.elbo(model, x)):
        with pytest.raises(ProtocolViolationError) as err:
            run()
        text = str(err.value)
        assert "encode(x) returned Independent(Normal) with scale" in text and word in text
        assert "at index (5, 1)" in text and "1 of 128 values" in text and len(text) < 600
    assert ProtocolViolationError.exit_code == ExitCode.RUNTIME


def test_negative_scale_used_to_give_silent_numbers(inner, x):
    """What the old code returned: a finite rate and a NaN conditional entropy, no error. Rebuilt here from the
    same distribution with the checks bypassed, to show the numbers the checks now refuse."""
    q = _Wrap(inner, scale=lambda s: -s).encode(x)
    kl = torch.distributions.kl_divergence(q, inner.prior())
    assert torch.isfinite(kl).all()                 # a plausible-looking rate, silently
    assert torch.isnan(q.entropy()).all()           # NaN conditional entropy
    with pytest.raises(ProtocolViolationError, match="scale -"):
        ld.rate(_Wrap(inner, scale=lambda s: -s), x)
    with pytest.raises(ProtocolViolationError):
        ld.conditional_entropy(_Wrap(inner, scale=lambda s: -s), x)


def test_check_model_lists_the_bad_scale(inner, x):
    with pytest.raises(ld.ModelProtocolError) as err:
        ld.check_model(_Wrap(inner, scale=_negative_at(0, 0)), x[:8])
    assert "encode(x) returned Independent(Normal) with scale -0.3 at index (0, 0)" in str(err.value)
    assert isinstance(err.value, ProtocolViolationError) and isinstance(err.value, TypeError)


def test_prior_with_bad_scale_or_nan_loc(inner, x):
    bad = _Wrap(inner, prior=lambda: Independent(Normal(torch.zeros(2, dtype=torch.float64),
                                                         torch.tensor([1.0, -2.0], dtype=torch.float64),
                                                         validate_args=False), 1))
    with pytest.raises(ProtocolViolationError, match=r"prior\(\) returned Independent\(Normal\) with scale -2"):
        ld.rate(bad, x)
    nan_loc = _Wrap(inner, prior=lambda: MultivariateNormal(torch.tensor([0.0, math.nan], dtype=torch.float64),
                                                            scale_tril=torch.eye(2, dtype=torch.float64),
                                                            validate_args=False))
    with pytest.raises(ProtocolViolationError, match=r"prior\(\) returned MultivariateNormal with loc nan"):
        ld.rate(nan_loc, x)
    with pytest.raises(ld.ModelProtocolError, match="scale -2"):
        ld.check_model(bad, x[:8])


def test_prior_with_batch_shape_is_refused_not_broadcast(inner, x):
    batched = _Wrap(inner, prior=lambda: Independent(Normal(torch.zeros(64, 2, dtype=torch.float64),
                                                            torch.ones(64, 2, dtype=torch.float64)), 1))
    # old code: kl_divergence broadcast the (64,) prior against the batch and returned a number
    assert torch.isfinite(torch.distributions.kl_divergence(batched.encode(x), batched.prior())).all()
    with pytest.raises(ProtocolViolationError) as err:
        ld.rate(batched, x)
    assert "batch_shape (64,)" in str(err.value) and "expected batch_shape () and event_shape (2,)" in str(err.value)
    with pytest.raises(ProtocolViolationError, match=r"batch_shape \(64,\)"):
        run_report(batched, x, metrics=["rate", "aggregate"])


@pytest.mark.parametrize("dims,word", [(0, "returned 0 "), (-5, "returned -5 "), (2.5, "returned 2.5 "),
                                       (math.inf, "returned inf ")])
def test_num_dims_that_are_not_positive_counts(inner, x, dims, word):
    model = _WithDims(inner, num_dims=lambda x: dims)
    with pytest.raises(ProtocolViolationError) as err:
        ld.distortion(model, x)
    assert "num_dims(x)" in str(err.value) and word in str(err.value) and "positive integer" in str(err.value)
    with pytest.raises(ld.ModelProtocolError, match="num_dims"):
        ld.check_model(model, x[:8])


def test_num_dims_tensor_with_one_zero(inner, x):
    def dims(x):
        d = torch.full((x.shape[0],), 6)
        d[3] = 0
        return d
    with pytest.raises(ProtocolViolationError, match="returned 0 at datapoint 3 of the batch"):
        ld.iw_nll(_WithDims(inner, num_dims=dims), x, k=2)
    with pytest.raises(ProtocolViolationError, match=r"shape \(2, 64\)"):
        ld.distortion(_WithDims(inner, num_dims=lambda x: torch.ones(2, x.shape[0])), x)


def test_valid_models_still_pass(inner, x):
    """A healthy model is not refused: the same numbers as before, and check_model passes."""
    ld.check_model(_WithDims(inner, num_dims=lambda x: 6), x[:8])
    assert ld.rate(inner, x).value == pytest.approx(ld.rate(_Wrap(inner), x).value, rel=1e-12)
    exact = LinearGaussianModel.random(6, 2, seed=0)  # full-covariance MultivariateNormal posterior
    assert math.isfinite(ld.rate(exact, x).value)
