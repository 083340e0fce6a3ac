"""Probabilistic PCA as a known-answer model: every quantity latentdiag estimates has a closed form here."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from latentdiag._validation import check_choice, check_int, check_positive_float

__all__ = ["LinearGaussianModel"]


class LinearGaussianModel(nn.Module):
    """Probabilistic PCA: z ~ N(0, I_D), x = W z + b + N(0, s^2 I_P) (Tipping & Bishop, 1999).

    Closed forms (C = W W^T + s^2 I, M = W^T W + s^2 I):

    - marginal: x ~ N(b, C), so log p(x) is exact (:meth:`log_marginal`);
    - posterior: p(z|x) = N(M^{-1} W^T (x - b), s^2 M^{-1}) (:meth:`exact_posterior`);
    - mutual information for data drawn from the model: I(X; Z) = 0.5 log det(I + W^T W / s^2)
      (:meth:`mutual_information`); it equals the rate of the exact posterior, whose aggregate posterior is p(z);
    - for any Gaussian q(z|x) = N(m, S): KL(q || p) = 0.5 (tr S + |m|^2 - D - log det S) and
      E_q log p(x|z) = log N(x; W m + b, s^2 I) - tr(W S W^T) / (2 s^2) (:meth:`exact_kl`, :meth:`exact_elbo`).

    Parameters
    ----------
    weight : Tensor (P, D)
        W, the loading matrix.
    bias : Tensor (P,)
        b, the data mean.
    noise_std : float
        s, the observation noise standard deviation (not the variance).
    posterior : {"exact", "mean_field"}
        What :meth:`encode` returns: the exact posterior (a full-covariance ``MultivariateNormal``, with a
        ``MultivariateNormal`` prior so that torch's analytic KL applies), or the best mean-field approximation
        (a diagonal ``Normal`` with variances s^2 / M_dd, the inverse of the precision diagonal): a deliberately
        wrong posterior, as a VAE's encoder would give.
    posterior_shift : float
        Added to every coordinate of the posterior mean (0 keeps it exact): a further deliberate error.
    posterior_scale : float
        Multiplies the posterior standard deviations (1 keeps them exact).
    dtype : torch.dtype
        float64 by default, so that known-answer tests can be tight.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, noise_std: float, *,
                 posterior: Literal["exact", "mean_field"] = "exact", posterior_shift: float = 0.0,
                 posterior_scale: float = 1.0, dtype: torch.dtype = torch.float64):
        super().__init__()
        weight = torch.as_tensor(weight, dtype=dtype)
        bias = torch.as_tensor(bias, dtype=dtype)
        if weight.ndim != 2:
            raise ValueError(f"weight must be a matrix (P, D); got shape {tuple(weight.shape)}.")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight; got {tuple(bias.shape)}.")
        self.noise_std = check_positive_float("noise_std", noise_std)
        self.posterior = check_choice("posterior", posterior, ("exact", "mean_field"))
        self.posterior_shift = float(posterior_shift)
        self.posterior_scale = check_positive_float("posterior_scale", posterior_scale)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        eye = torch.eye(weight.shape[1], dtype=dtype)
        m = weight.T @ weight + self.noise_std ** 2 * eye
        self.register_buffer("_m_inv", torch.linalg.inv(m))
        exact_cov = self.noise_std ** 2 * self._m_inv
        if self.posterior == "exact":
            cov = exact_cov
        else:
            cov = torch.diag(self.noise_std ** 2 / torch.diagonal(m))
        self.register_buffer("_q_cov", cov * self.posterior_scale ** 2)
        self.register_buffer("_q_scale_tril", torch.linalg.cholesky(self._q_cov))

    @classmethod
    def random(cls, obs_dim: int, latent_dim: int, *, noise_std: float = 0.5, weight_scale: float = 1.0,
               seed: int = 0, **kwargs) -> LinearGaussianModel:
        """A model with W ~ N(0, weight_scale^2 / D) entries and b ~ N(0, 1), from ``seed``."""
        obs_dim, latent_dim = check_int("obs_dim", obs_dim), check_int("latent_dim", latent_dim)
        g = torch.Generator().manual_seed(seed)
        weight = torch.randn(obs_dim, latent_dim, generator=g, dtype=torch.float64) * weight_scale / latent_dim ** .5
        bias = torch.randn(obs_dim, generator=g, dtype=torch.float64)
        return cls(weight, bias, noise_std, **kwargs)

    @property
    def obs_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.weight.shape[1]

    # -- protocol ---------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Distribution:
        mean = self._q_mean(x)
        if self.posterior == "exact":
            return MultivariateNormal(mean, scale_tril=self._q_scale_tril)
        return Independent(Normal(mean, torch.diagonal(self._q_scale_tril).expand_as(mean)), 1)

    def prior(self) -> Distribution:
        zeros = torch.zeros(self.latent_dim, dtype=self.weight.dtype, device=self.weight.device)
        if self.posterior == "exact":
            return MultivariateNormal(zeros, scale_tril=torch.diag(torch.ones_like(zeros)))
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        mean = z @ self.weight.T + self.bias
        return Normal(mean, self.noise_std).log_prob(x.to(mean.dtype)).sum(-1)

    def num_dims(self, x: torch.Tensor) -> int:
        return self.obs_dim

    # -- closed forms -----------------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` datapoints x ~ p(x), shape (n, P)."""
        n = check_int("n", n)
        dtype, device = self.weight.dtype, self.weight.device
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=dtype, device=device)
        eps = torch.randn(n, self.obs_dim, generator=generator, dtype=dtype, device=device)
        return z @ self.weight.T + self.bias + self.noise_std * eps

    def marginal(self) -> MultivariateNormal:
        """p(x) = N(b, W W^T + s^2 I)."""
        cov = self.weight @ self.weight.T + self.noise_std ** 2 * torch.eye(self.obs_dim, dtype=self.weight.dtype,
                                                                             device=self.weight.device)
        return MultivariateNormal(self.bias, covariance_matrix=cov)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per datapoint, shape (B,)."""
        return self.marginal().log_prob(x.to(self.weight.dtype))

    def exact_posterior(self, x: torch.Tensor) -> MultivariateNormal:
        """The true posterior p(z|x) = N(M^{-1} W^T (x - b), s^2 M^{-1}), whatever ``posterior`` is set."""
        return MultivariateNormal(self._exact_mean(x), covariance_matrix=self.noise_std ** 2 * self._m_inv)

    def mutual_information(self) -> float:
        """I(X; Z) = 0.5 log det(I + W^T W / s^2) nats, for data drawn from the model."""
        eye = torch.eye(self.latent_dim, dtype=self.weight.dtype, device=self.weight.device)
        return 0.5 * float(torch.logdet(eye + self.weight.T @ self.weight / self.noise_std ** 2))

    def exact_kl(self, x: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || p(z)) per datapoint for the posterior :meth:`encode` returns, shape (B,)."""
        mean = self._q_mean(x)
        d = self.latent_dim
        return 0.5 * (torch.trace(self._q_cov) + (mean ** 2).sum(-1) - d - torch.logdet(self._q_cov))

    def expected_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """E_q(z|x) log p(x|z) per datapoint, shape (B,): minus the distortion of each datapoint."""
        x = x.to(self.weight.dtype)
        mean = self._q_mean(x) @ self.weight.T + self.bias
        trace = torch.trace(self.weight @ self._q_cov @ self.weight.T)
        return Normal(mean, self.noise_std).log_prob(x).sum(-1) - trace / (2 * self.noise_std ** 2)

    def exact_elbo(self, x: torch.Tensor) -> torch.Tensor:
        """ELBO(x) = E_q log p(x|z) - KL(q(z|x) || p(z)) per datapoint, shape (B,)."""
        return self.expected_log_likelihood(x) - self.exact_kl(x)

    def _q_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self._exact_mean(x) + self.posterior_shift

    def _exact_mean(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.obs_dim:
            raise ValueError(f"x must have shape (B, {self.obs_dim}); got {tuple(x.shape)}.")
        return (x.to(self.weight.dtype) - self.bias) @ (self._m_inv @ self.weight.T).T

