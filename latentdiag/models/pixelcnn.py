"""PixelCNN decoders conditioned on a feature map computed from z: local (horizon h) and full.

Structure (Zhang et al., "Improving VAE-based Representation Learning", 2022, Section 5; van den Oord et al.,
"Pixel Recurrent Neural Networks", 2016), for an image x (B, C, H, W) scaled to [-1, 1] and conditioning features
c(z) (B, F, H, W):

    h0 = ReLU(concat[ x-path(x), 1x1-conv(c(z)) ])           # "2 masked layers": the x path and the z path
    h_{k+1} = h_k + ReLU(conv(ReLU(conv(ReLU(conv(h_k))))))   # 5 residual blocks
    params = 1x1-conv(ReLU(1x1-conv(h_K)))                    # per-pixel likelihood parameters

- local, horizon h >= 1: the x path is the local window (:class:`~latentdiag.models.masked_conv.LocalWindow`,
  one (2h + 1)-kernel mask-A layer or h stacked 3 x 3 layers) and every later convolution is 1 x 1, so the
  parameters at (i, j) see x only in the window of horizon h;
- local, h = 0: no x path at all: the decoder is conditionally independent given z (the plain VAE);
- full: a mask-A layer of kernel ``full_kernel`` (7 by default), then 3 x 3 mask-B convolutions in the residual
  blocks, so the receptive field grows with depth over the causal past (rows above and pixels to the left), minus
  the blind spot of stacked masked convolutions to the upper right (row i - r reaches columns up to
  j + full_kernel // 2 + r - 1).

There is no BatchNorm inside the PixelCNN: it lets the decoder pick up batch statistics and invites collapse
(Zhang et al. 2022, Section 4.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentdiag._validation import check_choice, check_int
from latentdiag.models.masked_conv import LOCAL_LAYERS, LocalWindow, MaskedConv2d

__all__ = ["ConditionalPixelCNN", "check_horizon"]


def check_horizon(horizon: object) -> int | str:
    """``horizon`` as an int >= 0 or the string "full"; anything else is refused with a clear error."""
    if isinstance(horizon, str):
        if horizon == "full":
            return horizon
        if horizon.isdigit():
            return int(horizon)
        raise ValueError(f"horizon must be an integer >= 0 or 'full'; got {horizon!r}.")
    return check_int("horizon", horizon, minimum=0)


class _ResidualBlock(nn.Module):
    """h + ReLU(conv3(ReLU(conv2(ReLU(conv1(h)))))) with masked-B k x k convolutions (k = 1 in a local decoder)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.convs = nn.ModuleList(MaskedConv2d(channels, channels, kernel, mask_type="B") for _ in range(3))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mid = h
        for conv in self.convs:
            mid = F.relu(conv(mid))
        return h + mid


class ConditionalPixelCNN(nn.Module):
    """A PixelCNN over x conditioned on a spatial feature map of z.

    Parameters
    ----------
    x_channels : int
        Channels C of the image.
    cond_channels : int
        Channels F of the conditioning feature map c(z).
    out_channels : int
        Likelihood parameters per pixel.
    horizon : int or "full"
        Dependency horizon h >= 0 of a local decoder, or "full".
    channels : int
        Width of the PixelCNN (the x path and the z path get half each; with h = 0 the z path gets all).
    res_blocks : int
        Number of residual blocks (three masked convolutions each).
    local_layer : {"kernel", "stacked"}
        How a local decoder builds its window.
    full_kernel : int
        Kernel of the first (mask-A) layer of the full decoder.
    """

    def __init__(self, x_channels: int, cond_channels: int, out_channels: int, *, horizon: int | str,
                 channels: int = 256, res_blocks: int = 5, local_layer: str = "kernel", full_kernel: int = 7):
        super().__init__()
        self.horizon = check_horizon(horizon)
        channels = check_int("channels", channels, minimum=2)
        res_blocks = check_int("res_blocks", res_blocks, minimum=0)
        self.local_layer = check_choice("local_layer", local_layer, LOCAL_LAYERS)
        self.full_kernel = check_int("full_kernel", full_kernel, minimum=3)
        half = channels // 2
        if self.horizon == "full":
            self.x_path: nn.Module | None = MaskedConv2d(x_channels, half, self.full_kernel, mask_type="A",
                                                         bias=False)
            kernel = 3
        elif self.horizon > 0:
            self.x_path = LocalWindow(x_channels, half, self.horizon, local_layer)
            kernel = 1
        else:
            self.x_path = None
            kernel = 1
        z_width = channels - half if self.x_path is not None else channels
        self.z_path = nn.Conv2d(cond_channels, z_width, 1, bias=False)
        self.blocks = nn.ModuleList(_ResidualBlock(channels, kernel) for _ in range(res_blocks))
        self.out1 = nn.Conv2d(channels, channels, 1)
        self.out2 = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Parameters (B, out_channels, H, W) for x (B, C, H, W) scaled to [-1, 1] and c(z) (B, F, H, W)."""
        hz = self.z_path(cond)
        h = hz if self.x_path is None else torch.cat([self.x_path(x.to(hz.dtype)), hz], dim=1)
        h = F.relu(h)
        for block in self.blocks:
            h = block(h)
        return self.out2(F.relu(self.out1(h)))
