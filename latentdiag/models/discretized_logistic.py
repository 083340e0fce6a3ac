"""Mixture of discretised logistics with linear dependence across channels (PixelCNN++ likelihood).

Salimans, Karpathy, Chen & Kingma, "PixelCNN++: Improving the PixelCNN with Discretized Logistic Mixture
Likelihood and Other Modifications" (ICLR 2017). For a pixel with channels x_1..x_C (levels 0..L-1, scaled to
[-1, 1] as x = 2 v / (L - 1) - 1) the model is

    p(x) = sum_k pi_k prod_c Logistic_disc(x_c ; mu_kc + sum_{c' < c} a_kcc' x_c', s_kc)

with a_kcc' = tanh(raw) (for RGB: mu_G + a x_R, mu_B + b x_R + c x_G). A discretised logistic puts on level v the
mass of its bin [x - 1/(L-1), x + 1/(L-1)], the outermost bins extending to -inf and +inf:

    P(v) = sigmoid((x + 1/(L-1) - mu) / s) - sigmoid((x - 1/(L-1) - mu) / s)       (0 < v < L - 1),
    P(0) = sigmoid((x + 1/(L-1) - mu) / s),   P(L-1) = 1 - sigmoid((x - 1/(L-1) - mu) / s).

The bin masses telescope to exactly 1. The log of a difference of sigmoids is computed without cancellation,

    log(sigmoid(a) - sigmoid(b)) = a + log(-expm1(b - a)) - softplus(a) - softplus(b),

so there is no "low probability" fallback to the density (which, in PixelCNN++'s code, makes the bins no longer
sum to 1). log-scales are clamped below at -7, as in PixelCNN++.

Parameter layout per pixel (``num_params(C, K)`` channels): K mixture logits, then C x K means, C x K log-scales,
then C (C - 1) / 2 x K raw coefficients (for C = 3: 10 K; for C = 1: 3 K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentdiag._validation import check_int

__all__ = ["num_params", "logistic_mixture_log_prob", "logistic_mixture_channel_log_probs", "LOG_SCALE_MIN"]

LOG_SCALE_MIN = -7.0


def num_params(channels: int, mixtures: int) -> int:
    """Parameters per pixel: K (logits) + 2 C K (means, log-scales) + C (C - 1) / 2 K (coefficients)."""
    channels, mixtures = check_int("channels", channels), check_int("mixtures", mixtures)
    return mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)


def _split(params: torch.Tensor, channels: int, mixtures: int):
    """(B, P, H, W) -> logits (B, K, H, W), means, log_scales (B, K, C, H, W), coeffs (B, K, C(C-1)/2, H, W)."""
    b, p, h, w = params.shape
    if p != num_params(channels, mixtures):
        raise ValueError(f"params must have {num_params(channels, mixtures)} channels for {channels} image "
                         f"channels and {mixtures} mixtures; got {p}.")
    k, c = mixtures, channels
    logits = params[:, :k]
    means = params[:, k:k + c * k].reshape(b, k, c, h, w)
    log_scales = params[:, k + c * k:k + 2 * c * k].reshape(b, k, c, h, w).clamp(min=LOG_SCALE_MIN)
    coeffs = torch.tanh(params[:, k + 2 * c * k:].reshape(b, k, c * (c - 1) // 2, h, w))
    return logits, means, log_scales, coeffs


def _adjusted_means(means: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mu_kc + sum_{c' < c} a_kcc' x_c' for every channel c, x (B, C, H, W) teacher-forced."""
    c = means.shape[2]
    out = [means[:, :, 0]]
    t = 0
    for ch in range(1, c):
        m = means[:, :, ch]
        for prev in range(ch):
            m = m + coeffs[:, :, t] * x[:, None, prev]
            t += 1
        out.append(m)
    return torch.stack(out, dim=2)


def _bin_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, levels: int) -> torch.Tensor:
    """log P(level of x) under a discretised logistic (see the module docstring); x on the scaled grid."""
    half = 1.0 / (levels - 1)
    inv = torch.exp(-log_scale)
    centred = x - mean
    plus = inv * (centred + half)
    minus = inv * (centred - half)
    lowest = -F.softplus(-plus)          # log sigmoid(plus)
    highest = -F.softplus(minus)         # log(1 - sigmoid(minus))
    middle = plus + torch.log(-torch.expm1(minus - plus)) - F.softplus(plus) - F.softplus(minus)
    return torch.where(x < -1 + half, lowest, torch.where(x > 1 - half, highest, middle))


def logistic_mixture_log_prob(x: torch.Tensor, params: torch.Tensor, *, mixtures: int,
                              levels: int = 256) -> torch.Tensor:
    """log p(x_ij) per pixel (B, H, W), joint over the C channels of each pixel, in the dtype of ``params``.

    Parameters
    ----------
    x : Tensor (B, C, H, W)
        Values scaled to [-1, 1] (x = 2 v / (L - 1) - 1 for levels v = 0..L-1).
    params : Tensor (B, num_params(C, K), H, W)
    mixtures : int
        K.
    levels : int
        L, the number of values per channel (256 for 8-bit images).
    """
    c = x.shape[1]
    logits, means, log_scales, coeffs = _split(params, c, mixtures)
    x = x.to(params.dtype)
    mu = _adjusted_means(means, coeffs, x)
    per_channel = _bin_log_prob(x[:, None], mu, log_scales, levels)        # (B, K, C, H, W)
    return torch.logsumexp(torch.log_softmax(logits, dim=1) + per_channel.sum(2), dim=1)


def logistic_mixture_channel_log_probs(x: torch.Tensor, params: torch.Tensor, *, mixtures: int,
                                       levels: int = 256) -> torch.Tensor:
    """Autoregressive per-channel log-probabilities over all L values, teacher-forced on x: (B, C, H, W, L).

    Entry [..., c, i, j, v] is log p(x_cij = v | x_<c,ij, context), where the earlier channels of the pixel take
    their values in x and the mixture weights are updated by them:

        p(x_c = v | x_<c) = sum_k w_k(x_<c) P_kc(v | x_<c),   w_k(x_<c) ~ pi_k prod_{c' < c} P_kc'(x_c' | x_<c').

    Each row sums to 1 over v, and sum_c log p(x_c | x_<c) = :func:`logistic_mixture_log_prob` (chain rule).
    Memory: B K C H W L values.
    """
    c = x.shape[1]
    logits, means, log_scales, coeffs = _split(params, c, mixtures)
    x = x.to(params.dtype)
    mu = _adjusted_means(means, coeffs, x)                                   # (B, K, C, H, W)
    observed = _bin_log_prob(x[:, None], mu, log_scales, levels)             # (B, K, C, H, W)
    grid = torch.linspace(-1.0, 1.0, levels, dtype=params.dtype, device=params.device)
    every = _bin_log_prob(grid, mu[..., None], log_scales[..., None], levels)  # (B, K, C, H, W, L)
    log_w = torch.log_softmax(logits, dim=1)                                 # (B, K, H, W)
    out = []
    for ch in range(c):
        w = log_w + observed[:, :, :ch].sum(2)
        w = w - torch.logsumexp(w, dim=1, keepdim=True)
        out.append(torch.logsumexp(w[..., None] + every[:, :, ch], dim=1))   # (B, H, W, L)
    return torch.stack(out, dim=1)
