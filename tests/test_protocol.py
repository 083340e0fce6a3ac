"""check_model: conforming models pass; each kind of violation is named, all of them in one error."""

from __future__ import annotations

import pytest
import torch
from helpers import CountingModel
from torch.distributions import Independent, Normal

import latentdiag as ld


def test_linear_gaussian_conforms(exact_model, wrong_model, x_model):
    info = ld.check_model(exact_model, x_model[:5])
    assert info.latent_dim == 4 and info.batch_size == 5 and info.analytic_kl
    assert info.capabilities == ("num_dims",)
    assert isinstance(exact_model, ld.LatentVariableModel)
    assert ld.check_model(wrong_model, (x_model[:3], torch.zeros(3))).posterior == "Independent"


class _Base(CountingModel):
    pass


class NoIndependent(_Base):
    """encode returns per-dimension Normals: batch (B, D), event () -- the commonest mistake."""

    def encode(self, x):
        q = self.inner.encode(x)
        return q.base_dist


def test_wrong_event_shape_is_named(wrong_model, x_model):
    with pytest.raises(ld.ModelProtocolError) as err:
        ld.check_model(NoIndependent(wrong_model), x_model[:5])
    msg = str(err.value)
    assert "event_shape ()" in msg and "expected (D,)" in msg
    assert "batch_shape (5, 4)" in msg and "Independent" in msg


def test_all_violations_are_reported_together(wrong_model, x_model):
    class Many(_Base):
        def encode(self, x):
            return self.inner.encode(x).base_dist

        def prior(self):
            return Independent(Normal(torch.zeros(3, dtype=torch.float64), 1.0), 1)

    with pytest.raises(ld.ModelProtocolError) as err:
        ld.check_model(Many(wrong_model), x_model[:4])
    violations = err.value.violations
    assert len(violations) >= 2
    assert any("batch_shape (4, 4)" in v for v in violations)
    assert any("event_shape ()" in v for v in violations)


def test_missing_methods_are_listed(x_model):
    class Half:
        def encode(self, x):
            return None

    with pytest.raises(ld.ModelProtocolError, match=r"missing required method prior\(\)") as err:
        ld.check_model(Half(), x_model[:2])
    assert "log_likelihood()" in str(err.value)
    assert not isinstance(Half(), ld.LatentVariableModel)


def test_prior_event_shape_mismatch(exact_model, x_model):
    class BadPrior(_Base):
        def prior(self):
            return Independent(Normal(torch.zeros(3, dtype=torch.float64), 1.0), 1)

    with pytest.raises(ld.ModelProtocolError, match=r"prior\(\) has event_shape \(3,\); expected \(4,\)"):
        ld.check_model(BadPrior(exact_model), x_model[:4])


def test_batched_prior_is_rejected(wrong_model, x_model):
    class BatchedPrior(_Base):
        def prior(self):
            return Independent(Normal(torch.zeros(4, 4, dtype=torch.float64), 1.0), 1)

    with pytest.raises(ld.ModelProtocolError, match=r"prior\(\) has batch_shape \(4,\); expected \(\)"):
        ld.check_model(BatchedPrior(wrong_model), x_model[:4])


def test_log_likelihood_shape_and_values(exact_model, x_model):
    class Summed(_Base):
        def log_likelihood(self, x, z):
            return super().log_likelihood(x, z).sum(0)

    with pytest.raises(ld.ModelProtocolError, match=r"log_likelihood\(x, z\) has shape \(4,\); expected \(2, 4\)"):
        ld.check_model(Summed(exact_model), x_model[:4])

    class Infinite(_Base):
        def log_likelihood(self, x, z):
            return super().log_likelihood(x, z) * float("inf")

    with pytest.raises(ld.ModelProtocolError, match="contains non-finite values"):
        ld.check_model(Infinite(exact_model), x_model[:4])

    class Raises(_Base):
        def log_likelihood(self, x, z):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(ld.ModelProtocolError, match="raised RuntimeError: mat1 and mat2"):
        ld.check_model(Raises(exact_model), x_model[:4])


def test_sample_dimension_mixed_with_batch_is_caught(exact_model, x_model):
    class MeanOverSamples(_Base):
        def log_likelihood(self, x, z):
            ll = super().log_likelihood(x, z)
            return ll.mean(0, keepdim=True).expand_as(ll)

    with pytest.raises(ld.ModelProtocolError, match="sample dimension S is mixed with the batch dimension B"):
        ld.check_model(MeanOverSamples(exact_model), x_model[:4])


def test_optional_capabilities_are_checked(exact_model, x_model):
    class BadLogits(_Base):
        def decoder_logits(self, x, z):
            return torch.zeros(x.shape[0], 3)

        def num_dims(self, x):
            return 0

    with pytest.raises(ld.ModelProtocolError) as err:
        ld.check_model(BadLogits(exact_model), x_model[:4])
    assert any("decoder_logits(x, z) has shape (4, 3)" in v for v in err.value.violations)
    assert any("num_dims(x) must return a positive int" in v for v in err.value.violations)


def test_encode_not_a_distribution(exact_model, x_model):
    class Tuple(_Base):
        def encode(self, x):
            return self.inner.encode(x).mean, self.inner.encode(x).stddev

    with pytest.raises(ld.ModelProtocolError, match="must return a torch.distributions.Distribution; got tuple"):
        ld.check_model(Tuple(exact_model), x_model[:4])


@pytest.mark.parametrize("x, exc, match", [
    ("batch", TypeError, "x must be a tensor"),
    (torch.zeros(0, 10), ValueError, "at least one datapoint"),
    (torch.tensor(2.0), ValueError, "at least one datapoint"),
])
def test_check_model_rejects_bad_x(exact_model, x, exc, match):
    with pytest.raises(exc, match=match):
        ld.check_model(exact_model, x)


def test_check_model_rejects_bad_samples(exact_model, x_model):
    with pytest.raises(ValueError, match="samples must be an integer >= 2; got 1"):
        ld.check_model(exact_model, x_model[:3], samples=1)


def test_require_capability_names_it(exact_model):
    from latentdiag.adapters import require_capability

    with pytest.raises(TypeError, match=r"decoding_divergence needs the model capability decoder_logits"):
        require_capability(exact_model, "decoder_logits", needed_by="decoding_divergence")
    require_capability(exact_model, "num_dims", needed_by="iw_nll")
