"""The fitted variational posterior (:class:`_Posterior`), the component and mixture densities, the analytic KL
terms of the ELBO, and log p(z) of the reference priors the marginal KL compares with."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from latentdiag._distributions import is_diagonal_normal
from latentdiag.estimators.mixed_membership._random import _STREAM_DRAWS, _rngs

_LOG_2PI = math.log(2 * math.pi)
_LOC_PRIOR_SCALE = 3.0      # loc ~ Normal(0, 3) per coordinate, in standardised units
_SCALE_PRIOR_SIGMA = 2.0    # scale ~ LogNormal(0, 2) per coordinate, in standardised units
_DF_PRIOR = (2.0, 0.1)      # df ~ Gamma(2, rate 0.1) (Juarez & Steel 2010), mean 20


@dataclass(frozen=True, eq=False)
class _Posterior:
    """The variational posterior in float64 on the CPU (standardised units) and the standardisation."""

    loc_m: torch.Tensor
    loc_s: torch.Tensor
    ls_m: torch.Tensor
    ls_s: torch.Tensor
    conc: torch.Tensor                      # (G, nb, K)
    ldf_m: torch.Tensor | None
    ldf_s: torch.Tensor | None
    center: torch.Tensor
    spread: torch.Tensor

    def weight_mean(self) -> torch.Tensor:
        return self.conc / self.conc.sum(-1, keepdim=True)

    def weight_std(self) -> torch.Tensor:
        a0 = self.conc.sum(-1, keepdim=True)
        return (self.conc * (a0 - self.conc) / (a0 ** 2 * (a0 + 1))).sqrt()

    def point(self) -> dict[str, torch.Tensor]:
        out = {"loc": self.loc_m, "scale": self.ls_m.exp(), "log_weights": self.weight_mean().log()}
        if self.ldf_m is not None:
            out["df"] = self.ldf_m.exp()
        return out

    def draw(self, n: int, seed: int | None) -> dict[str, torch.Tensor]:
        gen, rng = _rngs(seed, _STREAM_DRAWS)
        k, d = self.loc_m.shape
        loc = self.loc_m + self.loc_s * torch.randn(n, k, d, generator=gen, dtype=torch.float64)
        scale = (self.ls_m + self.ls_s * torch.randn(n, k, d, generator=gen, dtype=torch.float64)).exp()
        weights = torch.stack([_dirichlet_sample(self.conc, rng) for _ in range(n)])
        out = {"loc": loc, "scale": scale, "weights": weights,
               "log_weights": torch.log(weights.clamp_min(1e-300))}
        if self.ldf_m is not None:
            out["df"] = (self.ldf_m + self.ldf_s * torch.randn(n, *self.ldf_m.shape, generator=gen,
                                                               dtype=torch.float64)).exp()
        return out

    def log_density(self, z: torch.Tensor, point: Mapping[str, torch.Tensor], g: int, mode: str,
                    family: str) -> torch.Tensor:
        """log q_hat_g(z) on the data's scale, float64: (N,) multivariate, (N, D) univariate."""
        u = (z - self.center) / self.spread
        log_jac = torch.log(self.spread)
        df = point.get("df") if family == "student_t" else None
        log_w = point["log_weights"][g]                                           # (nb, K)
        out = []
        # chunks keep (chunk, K, D) temporaries near 4M elements
        k, d = self.loc_m.shape
        chunk = max(1, 4_000_000 // max(1, k * d))
        for i in range(0, u.shape[0], chunk):
            lf = _component_log_prob(u[i:i + chunk], point["loc"], point["scale"], df, mode, family)
            out.append(_mixture(lf, log_w))
        lq = torch.cat(out)                                                       # (N, nb)
        if mode == "multivariate":
            return lq[:, 0] - log_jac.sum()
        return lq - log_jac

    def summaries(self, family: str) -> dict[str, np.ndarray]:
        out = {"loc": (self.center + self.spread * self.loc_m).numpy(),
               "loc_std": (self.spread * self.loc_s).numpy(),
               "scale": (self.spread * self.ls_m.exp()).numpy(),
               "scale_log_std": self.ls_s.clone().numpy()}
        if family == "student_t":
            out["df"] = self.ldf_m.exp().numpy()
            out["df_log_std"] = self.ldf_s.clone().numpy()
        return out


# -- densities ----------------------------------------------------------------------------------------------------
def _component_log_prob(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, df: torch.Tensor | None,
                        mode: str, family: str) -> torch.Tensor:
    """log f_k(x) for every sample and component: (N, K) multivariate (summed over D), (N, D, K) univariate."""
    if mode == "multivariate":
        if family == "gaussian":
            # quadratic form as matrix products (fine in float32 on standardised samples, exact enough in float64)
            w = 1.0 / (scale * scale)
            const = -0.5 * (loc * loc * w).sum(-1) - torch.log(scale).sum(-1) - 0.5 * x.shape[-1] * _LOG_2PI
            return (-0.5 * (x * x)) @ w.transpose(-1, -2) + x @ (loc * w).transpose(-1, -2) + const
        t = (x[:, None, :] - loc[None]) / scale[None]                             # (N, K, D)
        return _student_t(t, df[None], scale[None]).sum(-1)
    t = (x[:, :, None] - loc.T[None]) / scale.T[None]                             # (N, D, K)
    if family == "gaussian":
        return -0.5 * t * t - torch.log(scale.T)[None] - 0.5 * _LOG_2PI
    return _student_t(t, df.T[None], scale.T[None])


def _student_t(t: torch.Tensor, df: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    half = 0.5 * (df + 1)
    return (torch.lgamma(half) - torch.lgamma(0.5 * df) - 0.5 * torch.log(df * math.pi) - torch.log(scale)
            - half * torch.log1p(t * t / df))


def _mixture(lf: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """log sum_k w_k f_k: lf (N, K) with log_w (1, K) -> (N, 1); lf (N, D, K) with log_w (D, K) -> (N, D)."""
    if lf.dim() == 2:
        return torch.logsumexp(lf + log_w[0][None], -1)[:, None]
    return torch.logsumexp(lf + log_w[None], -1)


def _normal_kl(m: torch.Tensor, s: torch.Tensor, m0: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    return torch.log(s0 / s) + (s * s + (m - m0) ** 2) / (2 * s0 * s0) - 0.5


def _dirichlet_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a0, b0 = a.sum(-1), b.sum(-1)
    return (torch.lgamma(a0) - torch.lgamma(a).sum(-1) - torch.lgamma(b0) + torch.lgamma(b).sum(-1)
            + ((a - b) * (torch.digamma(a) - torch.digamma(a0)[..., None])).sum(-1))


def _ldf_log_q_minus_p(ldf: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """log q(nu) - log p(nu) for nu = exp(ldf), q = LogNormal(m, s), p = Gamma(2, 0.1)."""
    from torch.distributions import Gamma, LogNormal

    nu = ldf.exp()
    return LogNormal(m, s).log_prob(nu) - Gamma(torch.full_like(nu, _DF_PRIOR[0]),
                                                torch.full_like(nu, _DF_PRIOR[1])).log_prob(nu)


def _dirichlet(conc: torch.Tensor) -> Distribution:
    from torch.distributions import Dirichlet

    return Dirichlet(conc, validate_args=False)


def _dirichlet_sample(conc: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Dirichlet draws (normalised Gamma draws from numpy's seeded generator; torch's sampler takes no generator)."""
    c = conc.detach().to("cpu", torch.float64).numpy()
    g = rng.gamma(c)
    total = g.sum(-1, keepdims=True)
    # all draws underflowing to 0 (tiny concentrations only): fall back to the mean
    x = np.where(total > 0, g / np.where(total > 0, total, 1.0), c / c.sum(-1, keepdims=True))
    return torch.from_numpy(x).to(conc.device, conc.dtype)


# -- references for the KL ----------------------------------------------------------------------------------------
def _reference_log_prob(prior: Distribution | str, z: torch.Tensor, mode: str, post: _Posterior,
                        groups: tuple[str, ...], family: str) -> tuple[torch.Tensor | None, str | None]:
    if isinstance(prior, str):
        return None, None
    from latentdiag.estimators.pairwise import marginal_log_prob

    if mode == "univariate":
        return _marginal_log_probs(prior, z), None
    per_dim = marginal_log_prob(prior, z)
    if per_dim is not None:
        return per_dim.sum(-1), None
    if isinstance(prior, MultivariateNormal):
        mvn = MultivariateNormal(prior.loc.detach().to("cpu", torch.float64),
                                 scale_tril=prior.scale_tril.detach().to("cpu", torch.float64))
        return mvn.log_prob(z), None
    try:
        dtype, dev = prior.mean.dtype, prior.mean.device
    except (NotImplementedError, AttributeError):
        dtype, dev = torch.get_default_dtype(), torch.device("cpu")
    with torch.no_grad():
        lp = prior.log_prob(z.to(dev, dtype)).to("cpu", torch.float64)
    note = None if dtype == torch.float64 else f"log p(z) was computed by the prior in its own dtype ({dtype})"
    return lp, note


def _marginal_log_probs(prior: Distribution, z: torch.Tensor) -> torch.Tensor:
    """log p(z_d) per dimension (N, D), float64, for priors with known one-dimensional marginals."""
    if isinstance(prior, MultivariateNormal):
        loc = prior.loc.detach().to("cpu", torch.float64).expand(z.shape[1])
        var = torch.diagonal(prior.covariance_matrix.detach().to("cpu", torch.float64), dim1=-2, dim2=-1)
        return Normal(loc, var.sqrt()).log_prob(z)
    if _factorises(prior):
        base = _to_cpu_double(prior.base_dist)
        with torch.no_grad():
            return base.log_prob(z).to(torch.float64)
    raise ValueError("univariate mode needs the prior's one-dimensional marginals: an Independent distribution "
                     f"(e.g. Independent(Normal(loc, scale), 1)) or a MultivariateNormal; got {type(prior).__name__}.")


def _factorises(prior: Distribution) -> bool:
    """Independent over one dimension with any base (Normal, Laplace, ...): its base gives the one-dimensional
    marginals. Deliberately laxer than ``is_diagonal_normal``: univariate mode needs marginals, not Gaussianity."""
    return isinstance(prior, Independent) and prior.reinterpreted_batch_ndims == 1


def _to_cpu_double(d: Distribution) -> Distribution:
    """A copy of a Normal / Independent(Normal) / MultivariateNormal on the CPU in float64 (others unchanged)."""
    if isinstance(d, Normal):
        return Normal(d.loc.detach().to("cpu", torch.float64), d.scale.detach().to("cpu", torch.float64))
    if is_diagonal_normal(d):
        return Independent(_to_cpu_double(d.base_dist), 1)
    if isinstance(d, MultivariateNormal):
        return MultivariateNormal(d.loc.detach().to("cpu", torch.float64),
                                  scale_tril=d.scale_tril.detach().to("cpu", torch.float64))
    return d
