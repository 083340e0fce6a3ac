"""Random streams of the mixed-membership model: every use of the seed in the package (the split, the
initialisation, the merge moves, the posterior draws, the prior draws) draws from its own stream of the project's
one seed scheme (:mod:`latentdiag._random`: (seed, purpose, keys); ``None`` fresh entropy)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from latentdiag._random import numpy_rng, seeded, torch_generator

# purposes of one seed (SVI itself draws from torch's global generator, seeded for the call with _STREAM_SVI)
_STREAM_SPLIT, _STREAM_INIT, _STREAM_MERGE, _STREAM_DRAWS, _STREAM_PRIOR, _STREAM_SVI = (
    "mixed_membership.split", "mixed_membership.init", "mixed_membership.merge", "mixed_membership.draws",
    "mixed_membership.prior_draws", "mixed_membership.svi")


def _generator(seed: int | None, stream: str, *keys: int) -> torch.Generator:
    """A CPU generator for one random stream of one seed (``None``: fresh entropy)."""
    return torch_generator(seed, stream, *keys)


def _rngs(seed: int | None, stream: str, *keys: int) -> tuple[torch.Generator, np.random.Generator]:
    """A torch CPU generator and a numpy generator for one stream of one seed (independent of each other)."""
    return torch_generator(seed, stream, 0, *keys), numpy_rng(seed, stream, 1, *keys)


def _merge_rngs(seed: int | None, merge_round: int, sweep: int) -> tuple[torch.Generator, np.random.Generator]:
    """The generators of one merge sweep (its subsamples and particles, common to all candidate pairs)."""
    return _rngs(seed, _STREAM_MERGE, merge_round, sweep)


def _prior_stream(seed: int | None) -> contextlib.AbstractContextManager[None]:
    """torch's global generator seeded for :func:`~latentdiag.estimators.mixed_membership.prior_draws` (a
    Distribution's ``sample`` takes no generator), restored afterwards; ``None`` draws fresh."""
    return seeded(seed, _STREAM_PRIOR)


def _svi_stream(seed: int | None, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """torch's global generators seeded for the SVI loop (Pyro's samplers draw from them)."""
    return seeded(seed, _STREAM_SVI, device)

