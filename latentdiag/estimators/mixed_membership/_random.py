"""Random streams of the mixed-membership model: every seed derivation of the package lives here (the split, the
initialisation, the merge moves, the posterior draws, the prior draws), so that one project-wide seed helper can
replace it in one place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from latentdiag._runtime import mix_seed

# random streams of one seed (SVI itself draws from torch's global generator, seeded for the call by `seeded`)
_STREAM_SPLIT, _STREAM_INIT, _STREAM_UNUSED, _STREAM_MERGE, _STREAM_DRAWS, _STREAM_PRIOR = range(6)


def _generator(seed: int | None, stream: int) -> torch.Generator:
    """A CPU generator for one random stream of one seed (``None``: fresh entropy)."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(mix_seed(seed * 16 + stream))
    return gen


def _rngs(seed: int | None, stream: int) -> tuple[torch.Generator, np.random.Generator]:
    """A torch CPU generator and a numpy generator for one stream of one seed."""
    gen = _generator(seed, stream)
    return gen, np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))



def _merge_rngs(seed: int | None, merge_round: int, sweep: int) -> tuple[torch.Generator, np.random.Generator]:
    """The generators of one merge sweep (its subsamples and particles, common to all candidate pairs)."""
    stream = 1000 * merge_round + sweep
    return _rngs(None if seed is None else seed + 104729 * stream, _STREAM_MERGE)


@contextlib.contextmanager
def _prior_stream(seed: int | None) -> Iterator[None]:
    """torch's global generator seeded for :func:`~latentdiag.estimators.mixed_membership.prior_draws` (``None``
    draws as 0; a Distribution's ``sample`` takes no generator), restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed((seed or 0) + _STREAM_PRIOR))
        yield
