"""Pyro VAEs speak the protocol: ``from_pyro(model_fn, guide_fn)`` reads q(z|x), p(z) and log p(x|z) from traces.

Pyro is imported only inside the functions (``import latentdiag`` stays light).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributions import Bernoulli, Categorical, Distribution, Independent, Normal

from latentdiag.adapters.protocol import UnsupportedModelError

__all__ = ["from_pyro", "PyroVAE"]


class PyroVAE(nn.Module):
    """A Pyro model/guide pair seen through the protocol. Build it with :func:`from_pyro`.

    - ``encode(x)``: the distribution at the guide's latent site, from one trace of ``guide_fn(x)``;
    - ``prior()``: the distribution at the model's latent site, from a trace of ``model_fn`` on an example
      datapoint (the model's p(z) must not depend on x);
    - ``log_likelihood(x, z)``: ``log_prob`` of the observation site in one trace of ``model_fn`` conditioned on
      the latent site (``pyro.poutine.condition``), vectorised over the S samples by flattening (S, B) into one
      data plate of size S * B (x is repeated S times);
    - ``num_dims(x)``: every element of one datapoint;
    - ``decoder_logits(x, z)``: only when the observation is Bernoulli or Categorical.
    """

    def __init__(self, model_fn: Callable[..., Any], guide_fn: Callable[..., Any], *, latent_site: str,
                 obs_site: str, module: nn.Module | None, example_x: torch.Tensor | None):
        super().__init__()
        self._model_fn = model_fn
        self._guide_fn = guide_fn
        self.latent_site = latent_site
        self.obs_site = obs_site
        self.owner = module
        self._example = None if example_x is None else example_x[:2].detach()
        self._obs_kind: str | None = None  # "bernoulli", "categorical" or the family's name, once seen

    # -- protocol ---------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Distribution:
        self._remember(x)
        trace = _trace(self._guide_fn, x)
        site = self._latent(trace, "guide", x.shape[0] if x.ndim else 1)
        return _plain(site["fn"])

    def prior(self) -> Distribution:
        if self._example is None:
            raise RuntimeError("PyroVAE.prior() traces the model on an example datapoint, and none is known yet: "
                               "pass example_x=... to from_pyro, or call encode(x) first.")
        example = self._example.to(self._device(self._example))
        trace = _trace(self._model_fn, example)
        self._note_obs(trace)
        fn = self._latent(trace, "model", example.shape[0])["fn"]
        return _first_of_batch(fn)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        fn, value, samples, batch = self._observation(x, z)
        log_p = fn.log_prob(value)
        if log_p.ndim == 0 or log_p.shape[0] != samples * batch:
            raise ValueError(f"the observation site {self.obs_site!r} gave log_prob of shape {tuple(log_p.shape)} for "
                             f"{samples * batch} datapoints; expected the data plate as its first dimension (use "
                             "pyro.plate('data', x.shape[0]) without subsampling, and .to_event(1) on the "
                             "per-datapoint dimensions).")
        return log_p.reshape(samples * batch, -1).sum(-1).reshape(samples, batch)

    def num_dims(self, x: torch.Tensor) -> int:
        """Observed dimensions per datapoint: every element of ``x[i]``."""
        return int(x[0].numel())

    @property
    def decoder_logits(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """Offered unless the observation site is known to be neither Bernoulli nor Categorical."""
        if self._obs_kind is not None and self._obs_kind not in ("bernoulli", "categorical"):
            return None
        return self._decoder_logits

    # -- helpers ----------------------------------------------------------------------------------------------
    def _decoder_logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(S, B, *x.shape[1:], V) teacher-forced logits of the observation (V = 2 for Bernoulli: values 0, 1).

        The observation must be x itself, possibly reshaped (as ``obs=x.reshape(-1, 784)``): its elements are
        mapped back onto x's shape in order."""
        fn, _, samples, batch = self._observation(x, z)
        base = _unwrap(fn)
        per_point = x[0].numel()
        if isinstance(base, Bernoulli):
            logits = base.logits.reshape(samples * batch, -1)
            logits = torch.stack([torch.zeros_like(logits), logits], dim=-1)
        elif isinstance(base, Categorical):
            logits = base.logits.reshape(samples * batch, -1, base.logits.shape[-1])
        else:
            raise UnsupportedModelError(f"decoder_logits needs a Bernoulli or Categorical observation; the site "
                                        f"{self.obs_site!r} is {type(base).__name__}.")
        if logits.shape[1] != per_point:
            raise UnsupportedModelError(f"decoder_logits maps the observation onto x, but the site {self.obs_site!r} "
                                        f"has {logits.shape[1]} values per datapoint and x has {per_point}.")
        return logits.reshape(samples, batch, *x.shape[1:], logits.shape[-1])

    def _observation(self, x: torch.Tensor, z: torch.Tensor) -> tuple[Distribution, torch.Tensor, int, int]:
        """The observation site's distribution and value in a trace of the model conditioned on z, with the S
        samples flattened into the data plate: x is repeated, (S, B, ...) -> (S * B, ...)."""
        from pyro import poutine

        if z.ndim != 3 or z.shape[1] != x.shape[0]:
            raise ValueError(f"z must have shape (S, B, D) with B = {x.shape[0]} datapoints; got {tuple(z.shape)}.")
        self._remember(x)
        samples, batch = z.shape[:2]
        xs = x.unsqueeze(0).expand(samples, *x.shape).reshape(samples * batch, *x.shape[1:])
        conditioned = poutine.condition(self._model_fn, data={self.latent_site: z.reshape(samples * batch, -1)})
        trace = _trace(conditioned, xs)
        self._latent(trace, "model", samples * batch)
        self._note_obs(trace)
        return trace.nodes[self.obs_site]["fn"], trace.nodes[self.obs_site]["value"], samples, batch

    def _latent(self, trace: Any, which: str, batch: int) -> dict[str, Any]:
        from pyro.poutine.util import site_is_subsample

        sites = {name: s for name, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
        site = sites.get(self.latent_site)
        if site is None:
            raise ValueError(f"the {which} has no sample site {self.latent_site!r}; its sample sites are "
                             f"{sorted(sites)}. Pass latent_site=... (and obs_site=...) to from_pyro.")
        if which == "model":
            if self.obs_site not in sites or not sites[self.obs_site]["is_observed"]:
                raise ValueError(f"the model has no observed sample site {self.obs_site!r}; its sample sites are "
                                 f"{sorted(sites)} (observed: "
                                 f"{sorted(n for n, s in sites.items() if s['is_observed'])}). Pass obs_site=....")
        others = sorted(n for n, s in sites.items() if n not in (self.latent_site, self.obs_site)
                        and not s["is_observed"])
        if others:
            raise UnsupportedModelError(f"the {which} has latent sample sites besides {self.latent_site!r}: {others}; "
                                        "from_pyro handles one latent site (log p(x|z) would need them integrated "
                                        "out).")
        fn = site["fn"]
        if tuple(fn.batch_shape) != (batch,) or len(fn.event_shape) != 1:
            raise ValueError(f"the {which}'s latent site {self.latent_site!r} has batch_shape {tuple(fn.batch_shape)} "
                             f"and event_shape {tuple(fn.event_shape)}; expected ({batch},) and (D,): sample it inside "
                             "pyro.plate('data', x.shape[0]) with .to_event(1), as in Pyro's VAE tutorial.")
        return site

    def _note_obs(self, trace: Any) -> None:
        if self._obs_kind is None and self.obs_site in trace.nodes:
            base = _unwrap(trace.nodes[self.obs_site]["fn"])
            self._obs_kind = ("bernoulli" if isinstance(base, Bernoulli) else
                              "categorical" if isinstance(base, Categorical) else type(base).__name__)

    def _remember(self, x: torch.Tensor) -> None:
        if self._example is None and isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[0] >= 1:
            self._example = x[:2].detach()

    def _device(self, fallback: torch.Tensor) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return fallback.device


def _trace(fn: Callable[..., Any], x: torch.Tensor) -> Any:
    from pyro import poutine

    return poutine.trace(fn).get_trace(x)


def _unwrap(fn: Distribution) -> Distribution:
    """The distribution under Independent / expanded / masked wrappers."""
    while hasattr(fn, "base_dist") and type(fn).__name__ in ("Independent", "ExpandedDistribution",
                                                              "MaskedDistribution"):
        fn = fn.base_dist
    return fn


def _plain(fn: Distribution) -> Distribution:
    """A diagonal Normal as plain ``torch`` ``Independent(Normal(loc, scale), 1)``; anything else unchanged."""
    base = _unwrap(fn)
    if isinstance(base, Normal) and len(fn.event_shape) == 1:
        shape = fn.batch_shape + fn.event_shape
        return Independent(Normal(base.loc.expand(shape), base.scale.expand(shape)), 1)
    return fn


def _first_of_batch(fn: Distribution) -> Distribution:
    """p(z) from the model's latent site over a batch of example datapoints: its first row, batch shape ()."""
    base = _unwrap(fn)
    if isinstance(base, Normal):
        shape = fn.batch_shape + fn.event_shape
        loc, scale = base.loc.expand(shape), base.scale.expand(shape)
        if not (torch.equal(loc, loc[:1].expand_as(loc)) and torch.equal(scale, scale[:1].expand_as(scale))):
            raise UnsupportedModelError("the model's p(z) differs between datapoints (a conditional prior p(z|x)): "
                                        "the protocol needs one prior p(z) for all datapoints.")
        return Independent(Normal(loc[0], scale[0]), 1)
    return _FirstOfBatch(fn)


class _FirstOfBatch(Distribution):
    """The first batch element of a distribution with batch shape (B,): batch shape (), same event shape."""

    arg_constraints: dict[str, Any] = {}

    def __init__(self, base: Distribution):
        self.base = base
        super().__init__(batch_shape=torch.Size(), event_shape=base.event_shape, validate_args=False)

    @property
    def support(self) -> Any:
        return self.base.support

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self.base.sample(sample_shape).select(-len(self.event_shape) - 1, 0)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self.base.rsample(sample_shape).select(-len(self.event_shape) - 1, 0)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        dim = -len(self.event_shape) - 1
        return self.base.log_prob(value.unsqueeze(dim)).select(-1, 0)


def from_pyro(model_fn: Callable[..., Any], guide_fn: Callable[..., Any], *, latent_site: str = "z",
              obs_site: str = "obs", module: nn.Module | None = None,
              example_x: torch.Tensor | None = None) -> PyroVAE:
    """Wrap a Pyro VAE, given as a model and a guide, as a :class:`latentdiag.LatentVariableModel`.

    The layout of Pyro's VAE tutorial: ``model_fn(x)`` and ``guide_fn(x)`` take a batch x and sample, inside
    ``pyro.plate("data", x.shape[0])``, the latent site (``pyro.sample(latent_site, dist.Normal(loc,
    scale).to_event(1))``); the model also samples the observation site (``pyro.sample(obs_site,
    dist.Bernoulli(probs).to_event(1), obs=x.reshape(-1, d))``). Then

    - q(z|x) is the guide's distribution at ``latent_site`` (a diagonal Normal becomes
      ``torch.distributions.Independent(Normal(loc, scale), 1)``, so analytic KLs and the encoded table apply);
    - p(z) is the model's distribution at ``latent_site``, traced on an example datapoint (it must be the same
      for every datapoint);
    - log p(x|z) = the observation site's ``log_prob`` in a trace of the model conditioned on z
      (``pyro.poutine.condition``). z of shape (S, B, D) is evaluated in **one** trace: (S, B) is flattened into
      the data plate (size S * B, x repeated S times), so a decoder only ever sees (N, D) codes; exact whenever
      the datapoints are conditionally independent given z, which the data plate declares.

    Parameters are read from the modules as they are (``pyro.module`` registers them in the current param store
    without changing them), the way Pyro's own ``Predictive`` runs a model.

    Parameters
    ----------
    model_fn, guide_fn : callable
        ``model_fn(x)`` and ``guide_fn(x)``; typically bound methods of one ``nn.Module`` (``vae.model``,
        ``vae.guide``).
    latent_site : str
        Name of the latent sample site in both (Pyro's tutorial calls it ``"latent"``).
    obs_site : str
        Name of the observed sample site in the model.
    module : nn.Module, optional
        The module holding the networks, so that ``.to(device)`` and ``.eval()`` on the wrapper reach them.
        Default: the ``nn.Module`` that ``model_fn`` (else ``guide_fn``) is a bound method of.
    example_x : tensor, optional
        A batch of data (its first two datapoints are kept) on which ``prior()`` traces the model. Default: the
        first batch the wrapper is given (``encode`` or ``log_likelihood``).

    Returns
    -------
    PyroVAE
        An ``nn.Module``. It offers ``num_dims`` and, for a Bernoulli or Categorical observation,
        ``decoder_logits`` (the observation must be x reshaped).

    Raises
    ------
    ValueError / UnsupportedModelError
        When a trace is used: a missing site (the message lists the sites found), a site outside the data plate
        or without ``.to_event(1)``, more than one latent site, or a prior that depends on x.

    References
    ----------
    Bingham et al., "Pyro: Deep Universal Probabilistic Programming" (JMLR 2019); Pyro's "Variational
    Autoencoders" tutorial.
    """
    for name, fn in (("model_fn", model_fn), ("guide_fn", guide_fn)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable (e.g. vae.model); got {type(fn).__name__}.")
    for name, value in (("latent_site", latent_site), ("obs_site", obs_site)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty string naming a Pyro sample site; got {value!r}.")
    if latent_site == obs_site:
        raise ValueError(f"latent_site and obs_site must differ; both are {latent_site!r}.")
    if module is None:
        owners = [getattr(fn, "__self__", None) for fn in (model_fn, guide_fn)]
        module = next((m for m in owners if isinstance(m, nn.Module)), None)
    elif not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}.")
    if example_x is not None and (not isinstance(example_x, torch.Tensor) or example_x.ndim == 0
                                  or example_x.shape[0] < 1):
        raise ValueError(f"example_x must be a tensor batch (B, ...) with B >= 1; got {example_x!r}.")
    return PyroVAE(model_fn, guide_fn, latent_site=latent_site, obs_site=obs_site, module=module,
                   example_x=example_x)
