"""Running latentdiag under ``torch.distributed``: the world this process sees, and :func:`process_local` for code
that runs on one rank only.

Under an initialised process group (``torchrun``, or a user's own) the per-datapoint estimators shard their
batches across ranks and the pairwise estimators their rows; every rank must call them, and every rank gets the
same result. Inside ``with process_local():`` they behave as without a group (this process computes everything,
no collective call): for a rank-0-only monitor during DDP training, which would otherwise wait for the other
ranks until the group's timeout.

The public face of ``latentdiag._distributed`` (the collectives the estimators use stay there).
"""

from latentdiag._distributed import is_distributed, process_local, world

__all__ = ["is_distributed", "process_local", "world"]
