"""Prior-vs-posterior decoding: does the decoder use the code, and where?

Rate says that information is sent; it does not say that the decoder reads it, nor at which positions. Following
Pelsmaeker & Aziz (2019, "Effective Estimation of Deep Generative Language Models") and the TransformerVAE thesis
(Sec. 4.3, Figures 4.10-4.12), each datapoint is decoded, teacher-forced on itself, with R codes z ~ q(z|x) and R
codes z ~ p(z), and the decoder's per-position output distributions are compared: by Jensen-Shannon divergence
(full distributions) and by accuracy drop (how often the argmax is the data), net of the spread among the
posterior repeats so that sampling noise is not read as use of the code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from latentdiag._batching import DataLike, iter_batches
from latentdiag._distributions import diagonal_marginals, from_standard_normal
from latentdiag._random import torch_generator
from latentdiag._runtime import evaluation, model_device
from latentdiag._validation import check_int, check_seed
from latentdiag.adapters.protocol import require_capability
from latentdiag.estimators._common import NonFiniteEstimateError, check_model_arg, mean_and_stderr, ratio_of_sums
from latentdiag.estimators.fold import Accumulator, BatchView, fold
from latentdiag.results import Estimate

__all__ = ["DecodingDivergence", "PositionProfile", "decoding_divergence", "decoded_examples",
           "js_divergence", "METRICS"]

_LN2 = math.log(2.0)

#: The per-position metrics of :func:`decoding_divergence`, in the order of its result.
METRICS: tuple[str, ...] = ("js", "accuracy_drop", "mode_shift")


def js_divergence(log_p: torch.Tensor, log_q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Jensen-Shannon divergence between categorical distributions given by normalised log-probabilities, in nats.

    JS(P, Q) = 1/2 KL(P || M) + 1/2 KL(Q || M) = sum_v [1/2 p_v log p_v + 1/2 q_v log q_v - m_v log m_v],
    M = (P + Q) / 2, with 0 log 0 = 0 (outcomes that both give probability 0, e.g. logits of -inf, are fine).
    Computed in float64 outcome by outcome in that second form (each term >= 0 by the convexity of x log x, and
    exactly 0 where p_v = q_v), summed and clamped to [0, ln 2] against rounding; the rounding is about
    1e-16 (1 + H(M)) nats absolute, so only divergences below ~1e-14 are mostly rounding. JS = 0 iff P = Q
    (exactly 0 when the inputs are equal); JS = ln 2 iff P and Q have disjoint supports.
    """
    for name, value in (("log_p", log_p), ("log_q", log_q)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            got = f"tensor of {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"js_divergence: {name} must be a floating-point torch.Tensor of log-probabilities; got "
                            f"{got}.")
    if log_p.shape != log_q.shape:
        raise ValueError(f"js_divergence: log_p and log_q must have the same shape; got {tuple(log_p.shape)} and "
                         f"{tuple(log_q.shape)}.")
    p, q = log_p.to(torch.float64).exp(), log_q.to(torch.float64).exp()
    return _js(p, _xlogx(p), q, _xlogx(q), dim)


_TINY = 1e-300
"""x log x is taken as x log max(x, 1e-300): exactly 0 at x = 0, and off by less than 1e-297 below 1e-300."""


def _xlogx(p: torch.Tensor) -> torch.Tensor:
    """p log p elementwise (a new tensor), 0 at p = 0."""
    return p.clamp(min=_TINY).log_().mul_(p)


def _js(p: torch.Tensor, h_p: torch.Tensor, q: torch.Tensor, h_q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """:func:`js_divergence` from float64 probabilities and their p log p (``h_p``, ``h_q``: computed once by the
    caller when one distribution meets many, as in the R x R pairs of the decoding metrics), broadcasting. One
    logarithm per outcome and pair (the form with log M = logaddexp(log P, log Q) - ln 2 costs an exponential and
    a logarithm more, several times the time)."""
    m = torch.add(p, q).mul_(0.5)
    terms = torch.add(h_p, h_q).sub_(_xlogx(m), alpha=2.0)   # twice 1/2 p log p + 1/2 q log q - m log m
    terms.masked_fill_(p == q, 0.0)                          # exactly 0, whatever the rounding of the logarithms
    return terms.sum(dim).mul_(0.5).clamp_(0.0, _LN2)


@dataclass(frozen=True, eq=False)
class PositionProfile:
    """One metric at each position (or relative-position bin): the mean over the datapoints that have it, the
    standard error of that mean (std(ddof=1) / sqrt(count); NaN with fewer than 2) and the count."""

    mean: np.ndarray
    stderr: np.ndarray
    count: np.ndarray


@dataclass(frozen=True, eq=False)
class DecodingDivergence:
    """Result of :func:`decoding_divergence`.

    Attributes
    ----------
    js, accuracy_drop, mode_shift : Estimate
        Means over datapoints of each datapoint's mean over its (non-padding) positions, with standard errors.
        ``extra`` holds the uncorrected parts and the token-weighted means (see :func:`decoding_divergence`).
    positions : tuple of int
        The shape of one datapoint's positions: (T,) for text, e.g. (1, 28, 28) for images.
    by_position : dict of str -> PositionProfile
        Each metric at each position (arrays of shape ``positions``); averaged over the datapoints for which the
        position is not padding. For images this is the per-pixel map.
    by_relative_position : dict of str -> PositionProfile
        Each metric in ``len(bin_edges) - 1`` bins of relative position (see :func:`decoding_divergence`).
    bin_edges : numpy.ndarray
        Edges of the relative-position bins in [0, 1].
    per_position : dict of str -> numpy.ndarray
        Each metric per datapoint and position, (N, *positions), NaN where the position does not count; empty
        when the maps were not kept (``per_position=False``: three N x positions float64 arrays less).
    mask : numpy.ndarray
        (N, *positions) bool: the positions that count (not padding).
    settings : dict
        Effective options.
    """

    js: Estimate
    accuracy_drop: Estimate
    mode_shift: Estimate
    positions: tuple[int, ...]
    by_position: dict[str, PositionProfile] = field(repr=False)
    by_relative_position: dict[str, PositionProfile] = field(repr=False)
    bin_edges: np.ndarray = field(repr=False)
    per_position: dict[str, np.ndarray] = field(repr=False)
    mask: np.ndarray = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        """Whether positions have a spatial shape (two or more position dimensions), so a map makes sense."""
        return len(self.positions) >= 2

    def results(self) -> list[Estimate]:
        """The three estimates as a list."""
        return [self.js, self.accuracy_drop, self.mode_shift]

    def to_frame(self):
        """One DataFrame row per estimate (``latentdiag.results_frame``)."""
        from latentdiag.results import results_frame

        return results_frame(self.results())

    def relative_position_frame(self):
        """A DataFrame with one row per relative-position bin: ``bin, start, end, center`` and, per metric,
        ``<metric>``, ``<metric>_stderr``, ``<metric>_datapoints``."""
        import pandas as pd

        edges = self.bin_edges
        columns: dict[str, Any] = {"bin": np.arange(edges.size - 1), "start": edges[:-1], "end": edges[1:],
                                   "center": 0.5 * (edges[:-1] + edges[1:])}
        for name, prof in self.by_relative_position.items():
            columns[name], columns[f"{name}_stderr"], columns[f"{name}_datapoints"] = prof.mean, prof.stderr, \
                prof.count
        return pd.DataFrame(columns)

    def position_frame(self):
        """A DataFrame with one row per position: its index along each position dimension (``pos0, pos1, ...``)
        and, per metric, ``<metric>``, ``<metric>_stderr``, ``<metric>_datapoints``."""
        import pandas as pd

        index = np.indices(self.positions).reshape(len(self.positions), -1)
        columns: dict[str, Any] = {f"pos{i}": index[i] for i in range(len(self.positions))}
        for name, prof in self.by_position.items():
            columns[name], columns[f"{name}_stderr"], columns[f"{name}_datapoints"] = prof.mean.reshape(-1), \
                prof.stderr.reshape(-1), prof.count.reshape(-1)
        return pd.DataFrame(columns)


def decoding_divergence(model: Any, data: DataLike, repeats: int = 5, *, seed: int | None = 0, batch_size: int = 32,
                        device: Any = None, position_bins: int = 10, pad_index: int | str | None = "auto",
                        mask: torch.Tensor | np.ndarray | Callable[[torch.Tensor], torch.Tensor] | None = None,
                        per_position: bool = True, progress: bool = False) -> DecodingDivergence:
    """Compare the decoder's per-position output distributions with posterior and with prior codes.

    For datapoint x (positions t, teacher-forced on x) draw R codes z^q_r ~ q(z|x) and R codes z^p_r ~ p(z)
    (r = 1..R, ``repeats``), and let P^q_r(t) = p(x_t | x_<t, z^q_r) and P^p_r(t) be the decoder's categorical
    distributions at t (softmax of ``model.decoder_logits``), a_r(t) = argmax of a distribution, and x_t the data.

    **Jensen-Shannon divergence, net of the posterior's own spread** (thesis Sec. 4.3: "we subtract the amount
    of internal variability within the 5 posterior experiments from the variability between the two sets")::

        JS_between(t) = 1/R^2            sum_{r, r'}   JS(P^q_r(t), P^p_{r'}(t))
        JS_within(t)  = 2/(R (R - 1))    sum_{r < r'}  JS(P^q_r(t), P^q_{r'}(t))
        JS(t)         = JS_between(t) - JS_within(t)

    **Accuracy drop** (Pelsmaeker & Aziz 2019)::

        acc_q(t) = 1/R sum_r 1[a(P^q_r(t)) = x_t],   acc_p(t) likewise with prior codes
        accuracy_drop(t) = acc_q(t) - acc_p(t)

    The same correction applied to this signed difference subtracts the within-posterior mean pairwise
    difference 1/(R (R - 1)) sum_{r != r'} (1[a(P^q_r) = x_t] - 1[a(P^q_{r'}) = x_t]), which is identically 0:
    a signed mean difference is already unbiased (0 in expectation when the code carries nothing about x), so the
    accuracy drop needs no correction, and its noise is in its standard error. The symmetric mode-level
    counterpart of the JS correction is reported as **mode shift**::

        mode_shift(t) = 1/R^2 sum_{r, r'} 1[a(P^q_r) != a(P^p_{r'})]
                        - 2/(R (R - 1)) sum_{r < r'} 1[a(P^q_r) != a(P^q_{r'})]

    Why the correction: if q(z|x) = p(z) (a collapsed posterior) every pair of codes is i.i.d., so
    E[JS_between] = E[JS_within] and E[JS(t)] = 0 exactly, even when the decoder is sensitive to z; a decoder
    that ignores z gives JS_between = JS_within = 0. A positive net value means posterior codes move the output
    more than the posterior's own noise does: the decoder uses what q(z|x) says about x, or prior codes land
    where the decoder saw no codes (an aggregate posterior far from the prior, i.e. a large marginal KL; read
    it next to :func:`latentdiag.aggregate_posterior`). Single datapoints or positions can be negative (noise);
    JS of each pair lies in [0, ln 2].

    **Aggregation.** Padding positions never contribute. A datapoint's value is the mean over its L_n counted
    positions; ``value`` is the mean over datapoints, ``stderr`` std(ddof=1)/sqrt(n) over datapoints (it
    includes the Monte Carlo noise, draws being independent across datapoints). ``extra["token_mean"]`` is the
    token-weighted mean sum_n sum_t v / sum_n L_n with a delta-method standard error. ``by_position`` averages
    each position over the datapoints where it counts (for images: the per-pixel map). ``by_relative_position``
    bins the relative position u = k / (L_n - 1) of the k-th counted position (k = 0..L_n-1; u = 0 when L_n = 1)
    of datapoint n into ``position_bins`` equal bins of [0, 1], u = 1 going to the last bin (so the first token
    is always in the first bin and the last one, e.g. ``<eos>``, in the last): per datapoint the mean over its
    positions in the bin, then mean and standard error over the datapoints that have any (thesis Figures
    4.11-4.12); short sequences leave some bins empty. For positions with a spatial shape the relative position
    follows raster order; read the map instead.

    Parameters
    ----------
    model : LatentVariableModel with ``decoder_logits``
        ``decoder_logits(x, z)`` with z (S, B, D) must return (S, B, *positions, V) with ``positions ==
        x.shape[1:]`` (position t predicts x at t). A model without it raises ``TypeError`` naming the capability.
    data : tensor, (x, y), DataSplit / TextSplit, Dataset, DataLoader or iterable of batches
        x must hold class indices (integer, or integer-valued floats such as binary pixels) in 0..V-1 at every
        counted position.
    repeats : int
        R >= 2, codes of each kind per datapoint (the thesis uses 5).
    seed : int or None
        Seeds the codes (the caller's random state is restored after).
    batch_size : int
        Datapoints per decoder call (the call decodes 2 R x B codes; memory about 2 R B |positions| V x 12 bytes).
    device : str or torch.device, optional
        As for every estimator; default the model's device.
    position_bins : int
        Number of relative-position bins.
    pad_index : int, None or "auto"
        Positions where x equals ``pad_index`` do not count. ``"auto"`` (default): the model's ``pad_index``
        attribute when it has an int one (the TransformerVAE does), else no padding. None: no padding.
    mask : tensor (N, *positions) of bool, or callable x -> (B, *positions) bool, optional
        Positions that count (True), aligned with the data order; combined with ``pad_index`` by AND.
    per_position : bool
        Keep each metric at every datapoint and position (``per_position`` of the result: 3 x 8 bytes per
        datapoint and position). The estimates and the profiles do not need them: they are accumulated from
        per-datapoint and per-position sums.
    progress : bool
        A progress bar on stderr.

    Returns
    -------
    DecodingDivergence
    """
    batch_size = check_int("batch_size", batch_size)
    seed = check_seed("seed", seed, allow_none=True)
    acc = DecodingAccumulator.for_model(model, repeats, decode_batch=batch_size, pad_index=pad_index, mask=mask,
                                        position_bins=position_bins, per_position=per_position)
    fold(model, data, [acc], batch_size=batch_size, seed=seed, device=device, progress=progress,
         desc="decoding_divergence")
    return acc.compute()


def _result(acc: DecodingAccumulator) -> DecodingDivergence:
    """The :class:`DecodingDivergence` of a folded :class:`DecodingAccumulator` (its ``compute()``).
    ``settings["batch_size"]`` is the accumulator's decoder batch. The per-datapoint values and profiles come from
    the per-datapoint and per-position sums of the batches; the (N, *positions) maps, when kept, are the
    accumulator's own arrays (no copy), so compute the result once per accumulator."""
    repeats, batch_size, position_bins = acc.repeats, acc.decode_batch, acc.position_bins
    mask_np = acc.value("mask").numpy()
    positions = tuple(mask_np.shape[1:])
    lengths = acc.value("lengths").numpy()
    if not lengths.any():
        raise ValueError("no position counts: every position of every datapoint is padding or masked out.")
    keep = lengths > 0
    counts = acc.value("position_count").numpy()
    bin_counts = acc.value("bin_count").numpy()

    settings = {"repeats": repeats, "seed": acc.run.seed, "batch_size": batch_size, "position_bins": position_bins,
                "padding": acc.padding, **acc.run.settings()}
    dropped = int((~keep).sum())
    common_notes = (f"{dropped} datapoint(s) without any counted position were left out",) if dropped else ()

    estimates, by_position, by_rel, per_position = {}, {}, {}, {}
    for name in METRICS:
        sums = acc.value(f"{name}.datapoint_sum").numpy()
        per_dp = np.full(lengths.shape, np.nan)
        per_dp[keep] = sums[keep] / lengths[keep]
        value, stderr = mean_and_stderr(per_dp[keep])
        token_mean, token_se = ratio_of_sums(sums[keep], lengths[keep].astype(np.float64))
        extra = {"token_mean": token_mean, "token_mean_stderr": token_se}
        for part in _PARTS[name]:
            extra[part], extra[f"{part}_stderr"] = mean_and_stderr(acc.value(part).numpy()[keep])
        extra["positions_per_datapoint"] = float(lengths[keep].mean())
        estimates[name] = Estimate(
            name=f"decoding_{name}", value=value,
            stderr=stderr, n=int(keep.sum()), unit=_UNITS[name], estimator=_HOW[name].format(R=repeats),
            settings=settings, notes=_NOTES[name] + common_notes, flags=("monte_carlo",), extra=extra,
            per_datapoint=per_dp)
        by_position[name] = _profile_from_sums(acc.value(f"{name}.position_sum").numpy(),
                                               acc.value(f"{name}.position_sq").numpy(), counts, positions)
        by_rel[name] = _binned_profile(acc.value(f"{name}.bin_sum").numpy(), bin_counts)
        if acc.per_position:  # in place (these arrays are this result's own): NaN where a position does not count
            values = acc.value(f"{name}.map").numpy()
            values[~mask_np] = np.nan
            per_position[name] = values
    edges = np.linspace(0.0, 1.0, position_bins + 1)
    profiles = (*by_position.values(), *by_rel.values())
    for array in (edges, mask_np, *per_position.values(),
                  *(a for prof in profiles for a in (prof.mean, prof.stderr, prof.count))):
        array.setflags(write=False)
    return DecodingDivergence(js=estimates["js"], accuracy_drop=estimates["accuracy_drop"],
                              mode_shift=estimates["mode_shift"], positions=positions, by_position=by_position,
                              by_relative_position=by_rel, bin_edges=edges, per_position=per_position,
                              mask=mask_np, settings=settings)


# -- per batch ------------------------------------------------------------------------------------------------

_PARTS = {"js": ("js_between", "js_within"), "accuracy_drop": ("accuracy_posterior", "accuracy_prior"),
          "mode_shift": ("disagreement_between", "disagreement_within")}
_UNITS = {"js": "nats", "accuracy_drop": "fraction", "mode_shift": "fraction"}
_HOW = {
    "js": "Jensen-Shannon divergence between teacher-forced decoder distributions with {R} posterior and {R} prior "
          "codes (all R^2 pairs) minus the mean over the R(R-1)/2 posterior pairs, per position, averaged over "
          "positions and data",
    "accuracy_drop": "argmax accuracy with {R} posterior codes minus with {R} prior codes, per position, averaged "
                     "over positions and data",
    "mode_shift": "argmax disagreement between {R} posterior and {R} prior codes minus among the posterior codes, "
                  "per position, averaged over positions and data",
}
_NOTES = {
    "js": ("net of the spread among posterior codes: about 0 when the decoder ignores z or q(z|x) is no more "
           "informative than p(z); single datapoints or positions can be negative",
           "prior codes far from the aggregate posterior (a large marginal KL) also raise it: read it next to the "
           "mutual information and marginal KL"),
    "accuracy_drop": ("posterior-code accuracy minus prior-code accuracy; a signed difference, unbiased without "
                      "correction (the within-posterior correction is identically 0)",),
    "mode_shift": ("net of the argmax disagreement among posterior codes",),
}


def _resolve_pad_index(model: Any, pad_index: Any) -> tuple[int | None, str]:
    if isinstance(pad_index, str):
        if pad_index != "auto":
            raise ValueError(f"pad_index must be an int, None or 'auto'; got {pad_index!r}.")
        found = getattr(model, "pad_index", None)
        if isinstance(found, int) and not isinstance(found, bool):
            return found, f"pad_index={found} (the model's)"
        return None, "none"
    if pad_index is None:
        return None, "none"
    pad_index = check_int("pad_index", pad_index, minimum=0)
    return pad_index, f"pad_index={pad_index}"


class DecodingAccumulator(Accumulator):
    """Per-position decoding metrics and their per-datapoint parts (:func:`decoding_divergence`'s state), from the
    shared posterior draws and keyed prior draws; decodes ``decode_batch`` datapoints per decoder call (2 R codes
    each) so that a fold's larger batches keep the decoder's memory bounded."""

    name = "decoding_divergence"

    def __init__(self, *, repeats: int = 5, decode_batch: int = 32, pad: int | None = None, mask: Any = None,
                 position_bins: int = 10, padding: str | None = None, per_position: bool = True) -> None:
        self.per_position = bool(per_position)
        self.states = _states(self.per_position)
        super().__init__()
        self.repeats = check_int("repeats", repeats, minimum=2)
        self.decode_batch = check_int("decode_batch", decode_batch)
        self.position_bins = check_int("position_bins", position_bins)
        self.pad, self.mask = pad, mask
        # how padding was chosen, for the settings ("pad_index=0 (the model's)" from for_model)
        self.padding = padding or ("none" if pad is None else f"pad_index={pad}")
        if mask is not None:
            self.padding += " and mask"

    @classmethod
    def for_model(cls, model: Any, repeats: int = 5, *, decode_batch: int = 32, pad_index: int | str | None = "auto",
                  mask: Any = None, position_bins: int = 10, per_position: bool = True) -> DecodingAccumulator:
        """The accumulator :func:`decoding_divergence` folds, its options checked as there (``pad_index="auto"``:
        the model's own ``pad_index``); its ``compute()`` after a fold is the :class:`DecodingDivergence`."""
        check_model_arg(model)
        require_capability(model, "decoder_logits", needed_by="decoding_divergence")
        repeats = check_int("repeats", repeats, minimum=2)
        pad, pad_rule = _resolve_pad_index(model, pad_index)
        if mask is not None and not (callable(mask) or isinstance(mask, (torch.Tensor, np.ndarray))):
            raise TypeError(f"mask must be None, a bool tensor (N, *positions) or a callable x -> mask; got "
                            f"{type(mask).__name__}.")
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(mask)
        return cls(repeats=repeats, decode_batch=decode_batch, pad=pad, mask=mask, position_bins=position_bins,
                   padding=pad_rule, per_position=per_position)

    def check_batch(self, x: torch.Tensor) -> None:
        if x.is_floating_point() and not bool((x == torch.round(x)).all()):
            raise ValueError("decoding_divergence needs x of class indices (integers, e.g. token ids, grey levels or "
                             "binary pixels); got non-integer values.")

    def update(self, view: BatchView) -> None:
        x, r = view.x, self.repeats
        valid = torch.ones(x.shape, dtype=torch.bool, device=x.device)
        if self.pad is not None:
            valid &= x != self.pad
        if self.mask is not None:
            valid &= _batch_mask(self.mask, x, view.index)
        z_q = view.posterior_draws(r)
        z_p = view.prior_draws(r).to(z_q.dtype)
        if tuple(z_p.shape) != tuple(z_q.shape):
            raise ValueError(f"prior().sample((R, B)) gave shape {tuple(z_p.shape)}; expected {tuple(z_q.shape)} like "
                             "encode(x).sample((R,)) (the prior must have batch_shape ()).")
        for lo in range(0, view.batch, self.decode_batch):
            part = slice(lo, lo + self.decode_batch)
            out = _batch_metrics(view.model, x[part], valid[part], z_q[:, part], z_p[:, part], r,
                                 self.position_bins, self.per_position)
            for key, value in out.items():
                self.add(key, value)

    def compute(self) -> DecodingDivergence:
        return _result(self)


def _batch_mask(mask: Any, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if callable(mask):
        out = mask(x)
        what = "mask(x)"
    else:
        first, last = int(index[0]), int(index[-1])
        if last >= mask.shape[0]:
            raise ValueError(f"mask has {mask.shape[0]} rows; the data have more datapoints (at least {last + 1}): "
                             "it needs one row per datapoint, in data order.")
        out = mask[index.to(mask.device)]
        what = f"mask[{first}:{last + 1}]"
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{what} must be a bool tensor of the batch's shape {tuple(x.shape)} (one entry per "
                         f"position of each datapoint); got {got}.")
    return out.to(device=x.device, dtype=torch.bool)


def _states(per_position: bool) -> dict[str, str]:
    """The accumulator's states: per datapoint (rows), per position (sums over datapoints) and, with
    ``per_position``, the (N, *positions) maps."""
    states = {"mask": "cat", "lengths": "cat", "position_count": "sum", "bin_count": "cat"}
    for name in METRICS:
        states.update({f"{name}.datapoint_sum": "cat", f"{name}.position_sum": "sum", f"{name}.position_sq": "sum",
                       f"{name}.bin_sum": "cat"})
        if per_position:
            states[f"{name}.map"] = "cat"
    states.update({part: "cat" for parts in _PARTS.values() for part in parts})
    return states


def _batch_metrics(model: Any, x: torch.Tensor, valid: torch.Tensor, z_q: torch.Tensor, z_p: torch.Tensor,
                   repeats: int, position_bins: int, per_position: bool) -> dict[str, torch.Tensor]:
    """One batch's states (see :func:`_states`), from R posterior codes z_q and R prior codes z_p, each
    (R, B, D)."""
    batch = x.shape[0]
    logits = model.decoder_logits(x, torch.cat([z_q, z_p], dim=0))
    codes = 2 * repeats
    if not isinstance(logits, torch.Tensor) or logits.ndim < 3 or tuple(logits.shape[:2]) != (codes, batch):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model.decoder_logits(x, z) must return (S, B, *positions, V) = ({codes}, {batch}, ..., V) "
                         f"for z of shape {(codes, batch, z_q.shape[-1])}; got {got}. Run "
                         "latentdiag.check_model(model, x) for details.")
    positions = tuple(logits.shape[2:-1])
    if positions != tuple(x.shape[1:]):
        raise ValueError(f"decoding_divergence needs one decoder distribution per element of x (position t predicts "
                         f"x at t): decoder_logits gave positions {positions} for x of shape {tuple(x.shape)}.")
    vocab = logits.shape[-1]
    target = _targets(x, vocab, valid)
    # (2R, B, V, L): the outcomes before the positions, so that the softmax and each pair's sum over outcomes
    # work on whole rows of positions (several times faster than over a short last axis, e.g. V = 2 for pixels)
    logits = logits.reshape(codes, batch, -1, vocab)
    modes = logits.argmax(-1)  # (2R, B, L): the softmax's argmax (over the last axis: fast)
    log_probs = logits.transpose(-1, -2).contiguous().to(torch.float64)
    del logits
    log_probs = torch.log_softmax(log_probs, dim=-2)
    counted = valid.reshape(batch, -1)
    bad = ~torch.isfinite(log_probs).all(-2) & counted
    if bad.any():
        raise NonFiniteEstimateError(f"decoding_divergence: decoder_logits gave NaN (or rows of -inf) at "
                                     f"{int(bad.any(0).sum())} datapoint-position(s) that count; check the model "
                                     "(latentdiag.check_model can help).")
    probs = log_probs.exp_()
    del log_probs
    h = _xlogx(probs)  # once per code, not once per pair
    post, prior, h_post, h_prior = probs[:repeats], probs[repeats:], h[:repeats], h[repeats:]
    js_between = torch.zeros(batch, counted.shape[1], dtype=torch.float64, device=x.device)
    js_within = torch.zeros_like(js_between)
    for r in range(repeats):  # posterior code r against all prior codes, and against the later posterior codes
        js_between += _js(post[r], h_post[r], prior, h_prior, dim=-2).sum(0)
        if r + 1 < repeats:
            js_within += _js(post[r], h_post[r], post[r + 1:], h_post[r + 1:], dim=-2).sum(0)
    del probs, h, post, prior, h_post, h_prior
    js_between /= repeats ** 2
    js_within /= repeats * (repeats - 1) / 2

    hits = (modes == target.reshape(1, batch, -1)).to(torch.float64)
    acc_q, acc_p = hits[:repeats].mean(0), hits[repeats:].mean(0)
    mq, mp = modes[:repeats], modes[repeats:]
    dis_between = (mq[:, None] != mp[None, :]).to(torch.float64).mean((0, 1))
    pairs = torch.triu_indices(repeats, repeats, offset=1, device=x.device)
    dis_within = (mq[pairs[0]] != mq[pairs[1]]).to(torch.float64).mean(0)

    lengths = counted.sum(1)
    bins = _relative_bins(counted, lengths, position_bins)
    out = {"mask": valid.cpu(), "lengths": lengths.cpu(), "position_count": counted.sum(0).cpu(),
           "bin_count": _bin_sums(counted.to(torch.int64), bins, position_bins).cpu()}
    metrics = {"js": js_between - js_within, "accuracy_drop": acc_q - acc_p, "mode_shift": dis_between - dis_within}
    for name, values in metrics.items():
        kept = torch.where(counted, values, 0.0)
        out[f"{name}.datapoint_sum"] = kept.sum(1).cpu()
        out[f"{name}.position_sum"] = kept.sum(0).cpu()
        out[f"{name}.position_sq"] = (kept * kept).sum(0).cpu()
        out[f"{name}.bin_sum"] = _bin_sums(kept, bins, position_bins).cpu()
        if per_position:
            out[f"{name}.map"] = values.reshape(x.shape).cpu()
    denominator = lengths.clamp(min=1).to(torch.float64)
    for name, values in (("js_between", js_between), ("js_within", js_within), ("accuracy_posterior", acc_q),
                         ("accuracy_prior", acc_p), ("disagreement_between", dis_between),
                         ("disagreement_within", dis_within)):
        out[name] = (torch.where(counted, values, 0.0).sum(1) / denominator).cpu()
    return out


def _relative_bins(counted: torch.Tensor, lengths: torch.Tensor, position_bins: int) -> torch.Tensor:
    """The relative-position bin (B, L) of every position: u = k / (L_n - 1) of the k-th counted position (u = 0
    when L_n = 1) in ``position_bins`` equal bins of [0, 1], u = 1 in the last; positions that do not count get
    a valid bin and add nothing."""
    rank = torch.cumsum(counted, dim=1) - 1
    rel = rank.to(torch.float64) / (lengths - 1).clamp(min=1).to(torch.float64)[:, None]
    return torch.floor(rel * position_bins).clamp_(0, position_bins - 1).to(torch.int64)


def _bin_sums(values: torch.Tensor, bins: torch.Tensor, position_bins: int) -> torch.Tensor:
    """Per datapoint, the sum of ``values`` (B, L) over the positions of each bin: (B, position_bins)."""
    return torch.zeros(values.shape[0], position_bins, dtype=values.dtype, device=values.device).scatter_add_(
        1, bins, values)


def _targets(x: torch.Tensor, vocab: int, valid: torch.Tensor) -> torch.Tensor:
    target = x.long()
    counted = target[valid]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= vocab):
        raise ValueError(f"x must hold class indices in 0..{vocab - 1} (V = {vocab} from decoder_logits) at every "
                         f"counted position; got values in [{int(counted.min())}, {int(counted.max())}].")
    return target


# -- aggregation ----------------------------------------------------------------------------------------------

def _profile_from_sums(sums: np.ndarray, squares: np.ndarray, counts: np.ndarray,
                       positions: tuple[int, ...]) -> PositionProfile:
    """Mean, standard error and count over datapoints at every position, from the sums of the values and of their
    squares: var = (sum v^2 - (sum v)^2 / n) / (n - 1). The metrics lie in [-1, 1], so the one-pass form loses
    nothing visible in float64 (about 1e-16 n absolute on the sums of squares)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.maximum(counts, 1)
        mean = np.where(counts > 0, sums / n, np.nan)
        var = np.where(counts > 1, np.maximum(squares - sums * sums / n, 0.0) / np.maximum(counts - 1, 1), np.nan)
        stderr = np.sqrt(var / n)
    return PositionProfile(mean=mean.reshape(positions), stderr=stderr.reshape(positions),
                           count=counts.reshape(positions).astype(np.int64))


def _binned_profile(sums: np.ndarray, counts: np.ndarray) -> PositionProfile:
    """Per bin: each datapoint's mean over its positions in the bin, then mean and standard error over the
    datapoints that have any (``sums``, ``counts``: (N, bins))."""
    n_bins = sums.shape[1]
    means, errs, have = np.full(n_bins, np.nan), np.full(n_bins, np.nan), np.zeros(n_bins, dtype=np.int64)
    for k in range(n_bins):
        has = counts[:, k] > 0
        have[k] = int(has.sum())
        if have[k]:
            means[k], errs[k] = mean_and_stderr(sums[has, k] / counts[has, k])
    return PositionProfile(mean=means, stderr=errs, count=have)


def decoded_examples(model: Any, data: DataLike, n: int = 5, *, seed: int | None = 0) -> dict[str, list[str]]:
    """Text a person reads: the first ``n`` sentences of ``data`` next to greedy decodings of them from a posterior
    code z ~ q(z|x) and from a prior code z ~ p(z) (models with ``generate(z)`` and a ``vocab``, e.g. the
    :class:`~latentdiag.models.TransformerVAE`).

    A model whose decoder uses the code rewrites each input from its posterior code (close to the input when the
    code carries the sentence) and writes an unrelated sentence from a prior code; a collapsed one writes the same
    sentence from both.
    """
    from latentdiag.adapters.protocol import UnsupportedModelError

    n = check_int("n", n)
    seed = check_seed("seed", seed, allow_none=True)
    vocab = getattr(model, "vocab", None)
    if not callable(getattr(model, "generate", None)) or vocab is None:
        raise UnsupportedModelError("decoded examples need a text model with generate(z) and a vocab")
    x = next(iter(iter_batches(data, batch_size=n))).x[:n]
    device = model_device(model)
    gen = torch_generator(seed, "decoded_examples")
    with evaluation(model), torch.no_grad():
        q, p = model.encode(x.to(device)), model.prior()
        eps = torch.randn(x.shape[0], q.event_shape[0], generator=gen, dtype=torch.float64)
        z_post = from_standard_normal(q, eps)
        if z_post is None:  # no location-scale form
            z_post = q.sample()
        loc, scale = diagonal_marginals(p)
        z_prior = loc + scale * torch.randn(x.shape[0], q.event_shape[0], generator=gen, dtype=torch.float64).to(loc)
        post, prior = model.generate(z_post), model.generate(z_prior)
    return {"input": [vocab.decode(r) for r in x], "posterior": [vocab.decode(r) for r in post],
            "prior": [vocab.decode(r) for r in prior]}
