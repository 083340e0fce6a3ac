"""Masked convolutions for PixelCNN decoders, and the local-window layer of the LPVAE.

A masked k x k convolution (van den Oord et al., "Pixel Recurrent Neural Networks", 2016) sees, at pixel (i, j),
only the rows above i (all k columns of the kernel) and, in row i, the columns left of j: mask ``"A"`` also hides
(i, j) itself (the first layer, which reads the image), mask ``"B"`` keeps it (later layers, whose (i, j) feature
already depends only on the past). Masks act per pixel (all channels of a pixel together): within-pixel channel
dependence (R -> G -> B) is left to the likelihood (see :mod:`latentdiag.models.discretized_logistic`).

The local window of horizon h (Zhang et al., "Improving VAE-based Representation Learning", 2022, Section 4.3) is

    x_ij^local = x[i-h : i-1, j-h : j+h]  and  x[i, j-h : j-1],

i.e. the h rows above (2h + 1 columns wide) and the h pixels to the left in the same row. Two layers give it:

- ``"kernel"``: one mask-A convolution with kernel 2h + 1 (followed by 1 x 1 layers): exactly the window;
- ``"stacked"``: a 3 x 3 mask-A convolution followed by h - 1 3 x 3 mask-B convolutions. Its receptive field is
  the window *minus* the classic PixelCNN blind spot: in row i - r (1 <= r < h) the columns right of j + r are
  unreachable, because each 3 x 3 step that reaches one column further right also moves up one row. For h = 1 it
  equals the window.

Zero padding stands for the pixels outside the image (the paper pads with zeros of width h).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentdiag._validation import check_choice, check_int

__all__ = ["MaskedConv2d", "LocalWindow", "causal_mask", "LOCAL_LAYERS"]

#: Implementations of the local window: one (2h + 1)-kernel layer, or h stacked 3 x 3 layers.
LOCAL_LAYERS: tuple[str, ...] = ("kernel", "stacked")


def causal_mask(kernel_size: int, mask_type: str) -> torch.Tensor:
    """The (k, k) 0/1 mask of a masked convolution: rows above the centre, and the centre row left of the centre
    (mask "A") or up to and including the centre (mask "B")."""
    kernel_size = check_int("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (a centred kernel); got {kernel_size}.")
    mask_type = check_choice("mask_type", mask_type, ("A", "B"))
    c = kernel_size // 2
    mask = torch.zeros(kernel_size, kernel_size)
    mask[:c, :] = 1.0
    mask[c, :c + (1 if mask_type == "B" else 0)] = 1.0
    return mask


class MaskedConv2d(nn.Conv2d):
    """A k x k convolution (stride 1, 'same' zero padding) whose kernel is multiplied by a causal mask.

    The mask is applied in the forward pass (``weight * mask``), so the masked weights get zero gradient and never
    leak information, whatever the optimiser does to them. The mask is a non-persistent buffer rebuilt from the
    constructor arguments (it is not part of the ``state_dict``).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int
        Odd k.
    mask_type : {"A", "B"}
        "A" hides the centre pixel (first layer reading x), "B" keeps it.
    bias : bool
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, mask_type: str, bias: bool = True):
        mask = causal_mask(kernel_size, mask_type)
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.mask_type = mask_type
        self.register_buffer("mask", mask[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask.to(self.weight.dtype), self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_type={self.mask_type!r}"


class LocalWindow(nn.Module):
    """Features at (i, j) that depend on x only through the local window of horizon h >= 1.

    Parameters
    ----------
    in_channels, out_channels : int
    horizon : int
        h >= 1.
    layer : {"kernel", "stacked"}
        One mask-A convolution with kernel 2h + 1, or a 3 x 3 mask-A convolution followed by h - 1 ReLU + 3 x 3
        mask-B convolutions (receptive field: the window minus the blind spot; see the module docstring).
    """

    def __init__(self, in_channels: int, out_channels: int, horizon: int, layer: str = "kernel"):
        super().__init__()
        self.horizon = check_int("horizon", horizon)
        self.layer = check_choice("layer", layer, LOCAL_LAYERS)
        if layer == "kernel":
            self.first = MaskedConv2d(in_channels, out_channels, 2 * horizon + 1, mask_type="A", bias=False)
            self.rest = nn.ModuleList()
        else:
            self.first = MaskedConv2d(in_channels, out_channels, 3, mask_type="A", bias=False)
            self.rest = nn.ModuleList(MaskedConv2d(out_channels, out_channels, 3, mask_type="B")
                                      for _ in range(horizon - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        for conv in self.rest:
            h = conv(F.relu(h))
        return h
