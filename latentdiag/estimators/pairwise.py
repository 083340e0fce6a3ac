"""Pairwise posterior densities log q(z_i | x_j) over all samples i and datapoints j, reduced by streaming
log-sum-exp over j: memory O(chunk^2), never O(N^2)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch.distributions import Distribution, MultivariateNormal, Normal

from latentdiag._distributions import diagonal_marginals, is_diagonal_normal
from latentdiag.estimators.encoded import EncodedTable

__all__ = ["logsumexp_log_q", "logsumexp_log_q_per_dim", "marginal_log_prob", "pairwise_chunk_size",
           "per_dim_block_elements", "no_tf32"]

_LOG_2PI = math.log(2 * math.pi)
_EXP_FLOOR = -700.0  # e^-700 ~ 1e-304: still a normal float64, and far below any sum that holds an own term

CPU_CHUNK = 1024
"""Rows (samples) and columns (datapoints) of one float64 block of :func:`logsumexp_log_q` on the CPU: an 8 MiB
block, the size the kernel was tuned at (larger blocks gain nothing on a CPU and leave the cache)."""
CPU_BLOCK_ELEMENTS = 1 << 17
"""Values in one block of :func:`logsumexp_log_q_per_dim` on the CPU: 1 MiB of float64, kept in cache."""
CUDA_MEMORY_FRACTION = 0.5
"""Share of the device's free memory one kernel's blocks may take on CUDA (the rest is left to the caller's
tensors, the caching allocator's fragmentation and other processes on the GPU)."""
_CUDA_MIN_CHUNK, _CUDA_MAX_CHUNK, _CUDA_CHUNK_STEP = 1024, 16384, 256
_CUDA_MAX_BLOCK_ELEMENTS = 1 << 28  # 2 GiB of float64: beyond it a launch gains nothing and a failure costs more


def _free_cuda_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device, from the driver (``torch.cuda.mem_get_info``)."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def pairwise_chunk_size(device: torch.device | str | None, latent_dim: int, *,
                        memory_fraction: float = CUDA_MEMORY_FRACTION) -> int:
    """The block side c of :func:`logsumexp_log_q` (c samples x c datapoints per float64 block) on ``device``.

    CPU (or None): :data:`CPU_CHUNK` = 1024, the rule the kernel always used, so CPU results are unchanged.
    CUDA: the largest multiple of 256 in [1024, 16384] whose block temporaries fit in ``memory_fraction`` of the
    free memory that ``torch.cuda.mem_get_info`` reports: 8 (3 c^2 + 8 c D) bytes, i.e. three (c, c) float64
    tensors (the product, the product plus constants, the exponentials; the sum and the running maximum are
    O(c)) and four (c, 2D) ones (features, coefficients and their inputs). A GPU is saturated only by large
    blocks, and the kernel's memory stays O(c^2), never O(N^2). With less free memory than a 1024 block needs,
    1024 is returned anyway (the allocation then fails with torch's own out-of-memory error, naming the device).
    """
    dev = torch.device("cpu" if device is None else device)
    if dev.type != "cuda":
        return CPU_CHUNK
    budget = memory_fraction * _free_cuda_bytes(dev) / 8          # float64 values
    d8 = 8.0 * latent_dim
    c = (-d8 + math.sqrt(d8 * d8 + 12.0 * budget)) / 6.0          # 3 c^2 + 8 D c = budget
    c = int(c) // _CUDA_CHUNK_STEP * _CUDA_CHUNK_STEP
    return max(_CUDA_MIN_CHUNK, min(_CUDA_MAX_CHUNK, c))


def per_dim_block_elements(device: torch.device | str | None, *,
                           memory_fraction: float = CUDA_MEMORY_FRACTION) -> int:
    """Values in one (samples x datapoints x D) block of :func:`logsumexp_log_q_per_dim` on ``device``.

    CPU (or None): :data:`CPU_BLOCK_ELEMENTS` (2^17, a block that stays in cache; CPU results unchanged). CUDA:
    ``memory_fraction`` of the free memory (``torch.cuda.mem_get_info``) over two float64 buffers of the block
    (the kernel's reused buffer and the temporary of its sum), rounded down to a power of two in
    [2^17, 2^28].
    """
    dev = torch.device("cpu" if device is None else device)
    if dev.type != "cuda":
        return CPU_BLOCK_ELEMENTS
    elements = int(memory_fraction * _free_cuda_bytes(dev) / 16)
    if elements < CPU_BLOCK_ELEMENTS:
        return CPU_BLOCK_ELEMENTS
    return min(_CUDA_MAX_BLOCK_ELEMENTS, 1 << (elements.bit_length() - 1))


@contextlib.contextmanager
def no_tf32(device: torch.device | str | None) -> Iterator[None]:
    """Inside: float32 CUDA matrix products in full float32, never TF32 (10-bit mantissa, ~1e-3 relative error,
    which the expanded Gaussian quadratic form turns into nats); the user's setting is restored on exit, also
    after an error. The kernels compute in float64, which TF32 never touches; the guard covers the float32
    ``log_prob`` of a model's own posterior on the generic path. On a non-CUDA device: nothing is changed.

    Through ``torch.backends.cuda.matmul.fp32_precision`` ("ieee" inside) where torch has it (>= 2.9): torch
    raises when a program reads the legacy ``allow_tf32`` after the new setting was used, and restoring the new
    setting leaves a user's legacy flag readable as it was. Older torch: the legacy ``allow_tf32``."""
    dev = torch.device("cpu" if device is None else device)
    if dev.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:
        saved, name, off = matmul.fp32_precision, "fp32_precision", "ieee"
    except AttributeError:
        saved, name, off = matmul.allow_tf32, "allow_tf32", False
    setattr(matmul, name, off)
    try:
        yield
    finally:
        setattr(matmul, name, saved)


def logsumexp_log_q(z: torch.Tensor, table: EncodedTable, *, chunk_size: int | None = None,
                    datapoints: tuple[int, int] | None = None, exclude: torch.Tensor | None = None,
                    groups: torch.Tensor | None = None,
                    on_chunk: Callable[[int], None] | None = None) -> torch.Tensor:
    """L_i = log sum_j q(z_i | x_j) over the datapoints j of ``table`` (or the range ``datapoints``), shape (M,).

    For diagonal Gaussians the quadratic form is a float64 matrix product over features [z^2, z]:
    log q(z|x_j) = -1/2 sum_d (z_d^2 w_jd - 2 z_d mu_jd w_jd + mu_jd^2 w_jd) - sum_d log s_jd - D/2 log 2 pi,
    w = 1 / s^2. float64 keeps the cancellation error ~1e-10 nats at s ~ 0.01 (float32 loses up to ~1 nat;
    TF32 is never used: the matmul runs on CPU in float64). Other families use their ``log_prob``. Blocks of
    ``chunk_size`` samples x ``chunk_size`` datapoints are reduced by streaming log-sum-exp; None (the default)
    takes :func:`pairwise_chunk_size` of z's device: 1024 on the CPU, from free memory on CUDA. The kernel runs
    on z's device (the table's parameters are moved there once), with TF32 off (:func:`no_tf32`).

    ``exclude`` (M,) names one datapoint per sample whose term is left out of the sum (the sample's own
    datapoint, for the leave-one-out mixture of Poole et al. 2019): it is set to -inf inside the block before the
    reduction, never subtracted afterwards, so the remaining sum keeps full float64 accuracy however much the
    own term dominated it. ``groups`` (N,) puts every datapoint in one of G groups (ids 0..G-1); the result is
    then (G, M), one sum per group (the nested subsets of a convergence table are prefix sums of these). Every
    block holds one group only on the matrix-product path, so each group's reduction is as exact as the whole.
    ``on_chunk(k)`` is called after each chunk of k samples (all datapoints done): a progress bar's update.
    """
    start, stop = datapoints if datapoints is not None else (0, table.n)
    z = z.to(torch.float64)
    if chunk_size is None:
        chunk_size = pairwise_chunk_size(z.device, z.shape[1])
    n_groups = 1
    if groups is not None:
        groups = torch.as_tensor(groups, dtype=torch.long)
        if groups.shape != (table.n,) or (table.n and int(groups.min()) < 0):
            raise ValueError(f"groups must hold one non-negative group id per datapoint, shape ({table.n},); got "
                             f"shape {tuple(groups.shape)}.")
        n_groups = int(groups.max()) + 1 if table.n else 1
    if exclude is not None:
        exclude = torch.as_tensor(exclude, dtype=torch.long)
        if exclude.shape != (z.shape[0],):
            raise ValueError(f"exclude must hold one datapoint index per sample, shape ({z.shape[0]},); got shape "
                             f"{tuple(exclude.shape)}.")
    with no_tf32(z.device):
        return _logsumexp_log_q(z, table, chunk_size, start, stop, exclude, groups, n_groups, on_chunk)


def _logsumexp_log_q(z, table, chunk_size, start, stop, exclude, groups, n_groups, on_chunk):
    """The loop of :func:`logsumexp_log_q`, on z's device (the block index tensors stay on the CPU)."""
    params = _diag_params(table, z.device)
    out = torch.full((n_groups, z.shape[0]), -math.inf, dtype=torch.float64, device=z.device)
    blocks = _datapoint_blocks(table, start, stop, chunk_size, groups)
    # every matrix-product block is computed in this one buffer, in turn (no allocation per block)
    width = max((b.numel() for b in blocks), default=0)
    buffer = (torch.empty(min(chunk_size, z.shape[0]) * width, dtype=torch.float64, device=z.device)
              if params is not None else None)
    for i0 in range(0, z.shape[0], chunk_size):
        i1 = min(i0 + chunk_size, z.shape[0])
        acc = out[:, i0:i1].clone()
        for cols in blocks:
            block = _block_log_q(z[i0:i1], table, cols, params, buffer)
            if exclude is not None:
                _mask_own(block, exclude[i0:i1], cols)
            if groups is None:
                acc[0] = torch.logaddexp(acc[0], _logsumexp_rows(block))
                continue
            ids = groups[cols]
            for g in torch.unique(ids).tolist():
                part = block if bool((ids == g).all()) else block[:, ids == g]
                acc[g] = torch.logaddexp(acc[g], _logsumexp_rows(part))
        out[:, i0:i1] = acc
        if on_chunk is not None:
            on_chunk(i1 - i0)
    return out if groups is not None else out[0]


def _diag_params(table: EncodedTable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A diagonal-Gaussian table's (loc, scale) on ``device``: the table's own tensors where they already lie
    there (always on the CPU: no copy, the same numbers); None for other families."""
    if table.family != "diag_normal":
        return None
    return table.loc.to(device), table.scale.to(device)


def _mask_own(block: torch.Tensor, own: torch.Tensor, cols: torch.Tensor) -> None:
    """Set block[r, c] = -inf where column c is row r's own datapoint (``cols`` sorted ascending)."""
    rows = ((own >= cols[0]) & (own <= cols[-1])).nonzero().squeeze(1)  # most blocks hold no own datapoint
    if rows.numel() == 0:
        return
    pos = torch.searchsorted(cols, own[rows]).clamp_(max=cols.numel() - 1)
    hit = cols[pos] == own[rows]
    block[rows[hit], pos[hit]] = -math.inf


def _logsumexp_rows(block: torch.Tensor) -> torch.Tensor:
    """Row-wise log-sum-exp that clamps terms more than 700 nats below the row maximum before ``exp``.

    Identical in float64 (e^-700 ~ 1e-304 cannot move a sum that holds 1), and several times faster: the CPU
    ``exp`` of arguments that underflow is 10-100x slower than of ordinary ones, and well-separated posteriors
    put most of a block there.
    """
    top = block.amax(dim=1, keepdim=True)
    empty = top == -math.inf  # rows where every density is 0 stay at -inf
    top = top.masked_fill(empty, 0.0)
    shifted = block.sub_(top).clamp_(min=_EXP_FLOOR).exp_()
    return (top.squeeze(1) + torch.log(shifted.sum(dim=1))).masked_fill(empty.squeeze(1), -math.inf)


def _datapoint_blocks(table: EncodedTable, start: int, stop: int, chunk: int,
                      groups: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Column index blocks (sorted): chunks of one group each for the matrix-product path; the encoder's batches
    (clipped) for the generic one, so that each batch's ``log_prob`` is evaluated once per sample chunk."""
    if table.family == "diag_normal":
        if groups is None:
            members = [torch.arange(start, stop)]
        else:
            ids = groups[start:stop]
            members = [start + (ids == g).nonzero().squeeze(1) for g in torch.unique(ids).tolist()]
        return [idx[k:k + chunk] for idx in members for k in range(0, idx.numel(), chunk)]
    bounds, lo = [], 0
    for q in table.batches:
        hi = lo + q.batch_shape[0]
        if max(lo, start) < min(hi, stop):
            bounds.append(torch.arange(max(lo, start), min(hi, stop)))
        lo = hi
    return bounds


def logsumexp_log_q_per_dim(z: torch.Tensor, table: EncodedTable, *, chunk_size: int = 32,
                            block_elements: int | None = None, groups: torch.Tensor | None = None,
                            on_chunk: Callable[[int], None] | None = None) -> torch.Tensor:
    """L_id = log sum_j q(z_id | x_j) for every sample i and dimension d, shape (M, D).

    The per-dimension marginals of the beta-TCVAE decomposition. Not a matrix product: each of the M x N x D terms
    needs its own exponential, so the kernel spends one exponential per term and four cheap passes around it:
    q(z_d|x_j) = c_d * exp(log r_jd - ((z_d - mu_jd) / (sqrt(2) s_jd))^2) with r_jd = s_min,d / s_jd <= 1 and
    c_d = 1 / (s_min,d sqrt(2 pi)) precomputed, so every term is <= c_d and the sums need no running maximum (no
    log-sum-exp passes). The square is of a difference, not an expanded quadratic, so there is no cancellation;
    float64 throughout. Exponents are clamped at -700 before ``exp``: the CPU ``exp`` of an argument that
    underflows is 10-50x slower than of an ordinary one, and a term of e^-700 ~ 1e-304 cannot move a sum that
    holds the sample's own term. Rows where clamped terms could matter (sum below N e^-663, i.e. z far outside
    every posterior, impossible for samples drawn from the table's own posteriors) are recomputed with an exact
    log-sum-exp. Blocks of ``chunk_size`` samples x J datapoints x D, with J such that a block holds about
    ``block_elements`` values, keep the temporary in cache; None (the default) takes
    :func:`per_dim_block_elements` of z's device: 2^17 on the CPU, from free memory on CUDA. The kernel runs on
    z's device (the table's parameters are moved there once), with TF32 off (:func:`no_tf32`).

    ``groups`` (N,) as in :func:`logsumexp_log_q`: the result is then (G, M, D), one sum per group of datapoints
    (each group is reduced over its own datapoints, and checked for clamped terms on its own). ``on_chunk(k)``
    as in :func:`logsumexp_log_q`, called with k = samples x (datapoints of the group) / N per chunk, so that
    the calls add up to M whatever the groups.
    """
    loc, scale = _marginal_params(table)
    z = z.to(torch.float64)
    loc, scale = loc.to(z.device), scale.to(z.device)   # no copy on the CPU
    if block_elements is None:
        block_elements = per_dim_block_elements(z.device)
    if groups is not None:
        groups = torch.as_tensor(groups, dtype=torch.long)
        if groups.shape != (table.n,):
            raise ValueError(f"groups must hold one group id per datapoint, shape ({table.n},); got shape "
                             f"{tuple(groups.shape)}.")
    with no_tf32(z.device):
        if groups is None:
            return _per_dim_sums(z, loc, scale, scale.min(0).values, chunk_size, block_elements, on_chunk, 1.0)
        s_min = scale.min(0).values
        out = torch.full((int(groups.max()) + 1, *z.shape), -math.inf, dtype=torch.float64, device=z.device)
        for g in torch.unique(groups).tolist():
            idx = (groups == g).nonzero().squeeze(1)
            out[g] = _per_dim_sums(z, loc[idx.to(loc.device)], scale[idx.to(loc.device)], s_min, chunk_size,
                                   block_elements, on_chunk, idx.numel() / max(table.n, 1))
        return out


def _per_dim_sums(z, loc, scale, s_min, chunk_size, block_elements, on_chunk=None, weight=1.0):
    """log sum_j N(z_id; loc_jd, scale_jd^2) over the rows j of loc/scale, (M, D); s_min <= every scale."""
    m, d = z.shape
    n = loc.shape[0]
    inv = math.sqrt(0.5) / scale                     # ((z - mu) / (sqrt(2) s))^2 = (z * inv - mu * inv)^2
    neg_shift = -loc * inv
    log_ratio = torch.log(s_min / scale)             # <= 0
    step = max(1, block_elements // (chunk_size * d))
    buf = torch.empty(min(chunk_size, m) * min(step, n) * d, dtype=torch.float64, device=z.device)
    out = torch.empty(z.shape, dtype=torch.float64, device=z.device)
    for i0 in range(0, m, chunk_size):
        zi = z[i0:i0 + chunk_size, None, :]
        acc = torch.zeros(zi.shape[0], d, dtype=torch.float64, device=z.device)
        for j0 in range(0, n, step):
            j1 = min(j0 + step, n)
            t = buf[:zi.shape[0] * (j1 - j0) * d].view(zi.shape[0], j1 - j0, d)
            torch.addcmul(neg_shift[None, j0:j1], zi, inv[None, j0:j1], out=t)      # (z - mu) / (sqrt(2) s)
            torch.addcmul(log_ratio[None, j0:j1], t, t, value=-1.0, out=t)         # log r - that^2
            acc += t.clamp_(min=_EXP_FLOOR).exp_().sum(1)
        out[i0:i0 + chunk_size] = acc.log()
        if on_chunk is not None:
            on_chunk(zi.shape[0] * weight)
    # clamped terms add at most n e^-700; recompute rows where that exceeds e^-37 (~1e-16) of the sum
    bad = (out < _EXP_FLOOR + math.log(n) + 37.0).any(1).nonzero().squeeze(1)
    out += -torch.log(s_min) - 0.5 * _LOG_2PI
    rows = max(1, block_elements // (n * d))
    for k in range(0, bad.numel(), rows):
        idx = bad[k:k + rows]
        out[idx] = torch.logsumexp(Normal(loc[None], scale[None]).log_prob(z[idx][:, None, :]), dim=1)
    return out


def marginal_log_prob(dist: Distribution, z: torch.Tensor) -> torch.Tensor | None:
    """log p(z_d) per dimension (M, D) in float64 for a prior that factorises over dimensions with known
    one-dimensional marginals (an Independent Normal, or a MultivariateNormal with diagonal covariance); else None.
    """
    z = z.to(torch.float64)
    if is_diagonal_normal(dist):
        loc, scale = diagonal_marginals(dist)
        return Normal(loc.double().cpu(), scale.double().cpu()).log_prob(z)
    if isinstance(dist, MultivariateNormal):
        cov = dist.covariance_matrix.double().cpu()
        var = torch.diagonal(cov, dim1=-2, dim2=-1)
        if (cov - torch.diag_embed(var)).abs().max() > 1e-12 * var.max():
            return None
        return Normal(dist.loc.double().cpu(), var.sqrt()).log_prob(z)
    return None


def _marginal_params(table: EncodedTable) -> tuple[torch.Tensor, torch.Tensor]:
    if table.family == "diag_normal":
        return table.loc, table.scale
    locs, scales = [], []
    for q in table.batches:
        if not isinstance(q, MultivariateNormal):
            raise NotImplementedError(f"per-dimension marginals of a {type(q).__name__} posterior are not available; "
                                      "total correlation needs diagonal Normal or MultivariateNormal posteriors.")
        cov = q.covariance_matrix.expand(*q.batch_shape, -1, -1)
        locs.append(q.loc.double().cpu())
        scales.append(torch.diagonal(cov, dim1=-2, dim2=-1).sqrt().double().cpu())
    return torch.cat(locs), torch.cat(scales)


def _block_log_q(z: torch.Tensor, table: EncodedTable, cols: torch.Tensor,
                 params: tuple[torch.Tensor, torch.Tensor] | None = None,
                 buffer: torch.Tensor | None = None) -> torch.Tensor:
    """log q(z_i | x_j) for a block of samples and the datapoints ``cols`` (sorted), float64 (I, J), on z's
    device; ``params`` = :func:`_diag_params` (the table's loc and scale on that device), else the table's own.
    ``buffer`` (flat float64, at least I x J values): the matrix-product block is computed in it."""
    if table.family == "diag_normal":
        loc_all, scale_all = params if params is not None else (table.loc, table.scale)
        cols = cols.to(loc_all.device)
        loc, scale = loc_all[cols], scale_all[cols]
        w = 1.0 / (scale * scale)
        feats = torch.cat([z * z, z], dim=1)                      # (I, 2D)
        coef = torch.cat([-0.5 * w, loc * w], dim=1)              # (J, 2D)
        const = -0.5 * (loc * loc * w).sum(1) - torch.log(scale).sum(1) - 0.5 * z.shape[1] * _LOG_2PI
        out = None if buffer is None else buffer[:z.shape[0] * cols.numel()].view(z.shape[0], cols.numel())
        return torch.addmm(const[None, :], feats, coef.T, out=out)
    return _generic_block(z, table, int(cols[0]), int(cols[-1]) + 1)


def _generic_block(z: torch.Tensor, table: EncodedTable, j0: int, j1: int) -> torch.Tensor:
    """log q(z_i | x_j) through the batch's own ``log_prob``; j0..j1 lies within one encoder batch."""
    lo = 0
    for q in table.batches:
        hi = lo + q.batch_shape[0]
        if lo <= j0 < hi:
            ref = q.mean
            lp = q.log_prob(z.to(ref.device, ref.dtype)[:, None, :])  # (I, b): every datapoint of the batch
            return lp[:, j0 - lo:j1 - lo].to(z.device, torch.float64)
        lo = hi
    raise IndexError(f"datapoint range {j0}..{j1} is outside the encoded table of {table.n}.")
