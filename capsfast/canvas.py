"""Digits on a larger canvas: the pieces MultiMNIST (36x36) and expanded MNIST / affNIST (40x40)
share. Every random number is a counter-based draw, a pure function of (seed, epoch, index,
stream), as capsfast.data's shifts are: the same pair or position on any device and for any number
of processes, with nothing to carry between steps or store in a checkpoint.
"""

from __future__ import annotations

import torch

from capsfast.data import _mix

TWO_POW_53 = float(2**53)


def draw(index: torch.Tensor, seed: int, epoch: int, stream: int) -> torch.Tensor:
    """A 63-bit hash [n] (int64, >= 0) of each (seed, epoch, index) on an independent `stream`
    (one stream per random choice, so that no two choices share bits)."""
    key = index.long() * 2_654_435_761 + (seed * 1_000_003 + epoch) * 40_503
    return _mix(_mix(key + stream * 0x9E3779B97F4A7C15 % (1 << 62) + 12_345))


def integers(h: torch.Tensor, low: torch.Tensor | int, high: torch.Tensor | int) -> torch.Tensor:
    """Integers uniform in [low, high] (inclusive, elementwise) from hashes h (bias < 2^-40)."""
    return low + h % (torch.as_tensor(high) - low + 1)


def uniform(h: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """float64 uniform in [low, high) from hashes h (their top 53 bits)."""
    return low + (high - low) * ((h >> 10).double() / TWO_POW_53)


def place(digits: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """Paste digits [n, h, w] into black [n, size, size] canvases with their top-left corners at
    (top, left) [n]; every digit must fit."""
    n, h, w = digits.shape
    device = digits.device
    rows = top.to(device).long()[:, None] + torch.arange(h, device=device)
    cols = left.to(device).long()[:, None] + torch.arange(w, device=device)
    canvas = digits.new_zeros(n, size, size)
    canvas[torch.arange(n, device=device)[:, None, None], rows[:, :, None], cols[:, None, :]] = (
        digits
    )
    return canvas


def ink_boxes(images: torch.Tensor) -> torch.Tensor:
    """Bounding boxes [n, 4] = (top, left, bottom, right), bottom/right exclusive, of the
    non-zero pixels of images [n, H, W] (an empty image gets the empty box (0, 0, 0, 0))."""
    rows, cols = images.amax(dim=2) > 0, images.amax(dim=1) > 0  # [n, H], [n, W]

    def span(mask):
        size = mask.shape[1]
        first = mask.int().argmax(dim=1)
        last = size - mask.flip(1).int().argmax(dim=1)
        empty = ~mask.any(dim=1)
        return first.masked_fill(empty, 0), last.masked_fill(empty, 0)

    (top, bottom), (left, right) = span(rows), span(cols)
    return torch.stack([top, left, bottom, right], dim=1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)


def intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Area [n] of the intersection of the boxes a[k] and b[k]."""
    top, left = torch.maximum(a[:, 0], b[:, 0]), torch.maximum(a[:, 1], b[:, 1])
    bottom, right = torch.minimum(a[:, 2], b[:, 2]), torch.minimum(a[:, 3], b[:, 3])
    return (bottom - top).clamp_min(0) * (right - left).clamp_min(0)
