"""Masked convolutions and PixelCNN receptive fields: the logits at (i, j) depend on x exactly on the local window
(horizon h), or on the causal past for the full decoder, and never on (i, j) itself or on the future."""

from __future__ import annotations

import pytest
import torch

from latentdiag.models.masked_conv import LocalWindow, MaskedConv2d, causal_mask
from latentdiag.models.pixelcnn import ConditionalPixelCNN, check_horizon

SIZE = 9  # odd image side, so that interior pixels have the whole window inside the image


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread avoids OpenMP stalls


def test_causal_masks_known_values():
    a = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    b = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    assert torch.equal(causal_mask(3, "A"), a) and torch.equal(causal_mask(3, "B"), b)
    assert causal_mask(1, "A").sum() == 0 and causal_mask(1, "B").sum() == 1
    assert causal_mask(5, "A").sum() == 12  # two full rows of 5 and two pixels left of the centre
    with pytest.raises(ValueError, match="odd"):
        causal_mask(4, "A")
    with pytest.raises(ValueError, match="mask_type"):
        causal_mask(3, "C")


def test_masked_weights_get_no_gradient_and_mask_is_not_saved():
    torch.manual_seed(0)
    conv = MaskedConv2d(2, 3, 5, mask_type="A")
    conv(torch.randn(4, 2, 7, 7)).square().sum().backward()
    hidden = conv.mask.expand_as(conv.weight) == 0
    assert torch.all(conv.weight.grad[hidden] == 0) and torch.any(conv.weight.grad[~hidden] != 0)
    assert "mask" not in conv.state_dict()


def _support(net: torch.nn.Module, x_channels: int = 1) -> torch.Tensor:
    """support[i, j, k, l] = the logits at (i, j) depend on the input pixel (k, l) (float64 Jacobian, summed over
    three random images so that an accidental zero cannot hide a dependence)."""
    torch.manual_seed(1)
    net = net.double()
    cond = torch.randn(3, 2, SIZE, SIZE, dtype=torch.float64)
    x = torch.randn(3, x_channels, SIZE, SIZE, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda inp: net(inp, cond), x)      # (B, O, H, W, B, C, H, W)
    per_image = torch.stack([jac[b, :, :, :, b] for b in range(3)])             # (B, O, H, W, C, H, W)
    return per_image.abs().sum(dim=(0, 1, 4)) > 0                               # (H, W, H, W)


def _expected(rule) -> torch.Tensor:
    out = torch.zeros(SIZE, SIZE, SIZE, SIZE, dtype=torch.bool)
    for i in range(SIZE):
        for j in range(SIZE):
            for k in range(SIZE):
                for m in range(SIZE):
                    out[i, j, k, m] = rule(k - i, m - j)
    return out


def window(h: int):
    """The local window of horizon h (Zhang et al. 2022, Section 4.3), as a rule on offsets (di, dj)."""
    return lambda di, dj: (-h <= di <= -1 and -h <= dj <= h) or (di == 0 and -h <= dj <= -1)


def stacked_window(h: int):
    """h stacked 3x3 masked layers: the window minus the blind spot (row i - r reaches columns up to j + r)."""
    return lambda di, dj: (-h <= di <= -1 and -h <= dj <= -di) or (di == 0 and -h <= dj <= -1)


def blind_causal_past(half: int):
    """A mask-A first layer of kernel 2 half + 1 and enough 3x3 mask-B layers: the causal past minus the blind
    spot (row i - r reaches columns up to j + half + r - 1)."""
    return lambda di, dj: (di <= -1 and dj <= half - di - 1) or (di == 0 and dj <= -1)


def _never_self_or_future(support: torch.Tensor) -> None:
    for i in range(SIZE):
        for j in range(SIZE):
            future = torch.zeros(SIZE, SIZE, dtype=torch.bool)
            future[i + 1:] = True
            future[i, j:] = True                                                # (i, j) itself included
            assert not support[i, j][future].any(), f"pixel ({i}, {j}) sees itself or the future"


@pytest.mark.parametrize("h", [1, 2, 3])
def test_local_kernel_window_is_exact(h):
    net = ConditionalPixelCNN(1, 2, 3, horizon=h, channels=8, res_blocks=2, local_layer="kernel")
    support = _support(net)
    _never_self_or_future(support)
    assert torch.equal(support, _expected(window(h)))


@pytest.mark.parametrize("h", [1, 2, 3])
def test_local_stacked_window_is_the_window_minus_the_blind_spot(h):
    net = ConditionalPixelCNN(1, 2, 3, horizon=h, channels=8, res_blocks=2, local_layer="stacked")
    support = _support(net)
    _never_self_or_future(support)
    assert torch.equal(support, _expected(stacked_window(h)))
    assert not (support & ~_expected(window(h))).any()                         # inside the window
    if h == 1:
        assert torch.equal(support, _expected(window(1)))


def test_horizon_zero_ignores_x():
    net = ConditionalPixelCNN(1, 2, 3, horizon=0, channels=8, res_blocks=2)
    assert net.x_path is None
    assert not _support(net).any()


def test_full_decoder_sees_the_causal_past():
    # first kernel 3 (half = 1) and 3 blocks x 3 masked 3x3 layers = 9 >= SIZE - 1: the field covers the image
    net = ConditionalPixelCNN(1, 2, 3, horizon="full", channels=8, res_blocks=3, full_kernel=3)
    support = _support(net)
    _never_self_or_future(support)
    assert torch.equal(support, _expected(blind_causal_past(1)))
    # the whole causal past of the last pixel but the blind spot; in particular every pixel to its left and above
    assert support[SIZE - 1, SIZE - 1, :SIZE - 1, :].all() and support[SIZE - 1, SIZE - 1, SIZE - 1, :-1].all()


def test_full_decoder_with_rgb_input_keeps_within_pixel_channels_hidden():
    net = ConditionalPixelCNN(3, 2, 4, horizon="full", channels=8, res_blocks=1, full_kernel=3)
    support = _support(net, x_channels=3)
    _never_self_or_future(support)


def test_local_window_layer_and_horizon_validation():
    assert isinstance(LocalWindow(1, 4, 2, "stacked").rest[0], MaskedConv2d)
    assert check_horizon("full") == "full" and check_horizon("2") == 2 and check_horizon(0) == 0
    for bad in ("x", -1, 1.5):
        with pytest.raises((ValueError, TypeError)):
            check_horizon(bad)
