"""Robustness to affine transformations (Sabour et al. 2017, section 5.2): train on MNIST digits
placed at random positions on a 40x40 black canvas ("expanded MNIST"), test on affNIST.

The paper: "each example is an MNIST digit placed randomly on a black background of 40x40
pixels"; the authors' README builds it with `--shift=6 --pad=6`: the 28x28 digit padded by 6 to
40x40 and shifted by an integer (dy, dx), each uniform in [-6, 6], which reaches every position of
the 28x28 frame inside the canvas. Positions are drawn per (seed, epoch, index) on the device, as
MNIST's 2-pixel shifts are (capsfast.canvas). The expanded test set puts each test digit at one
fixed, seeded position.

affNIST (Tijmen Tieleman, www.cs.toronto.edu/~tijmen/affNIST/) transforms each MNIST digit by a
random affine map and a translation inside a 40x40 frame; its test set is 32 transformed copies
of each of the 10,000 MNIST test digits. Its published ranges, each drawn uniformly:

    rotation          -20 to +20 degrees
    shearing          -0.2 to +0.2
    vertical scale    0.8 to 1.2
    horizontal scale  0.8 to 1.2
    translation       any, as long as the digit stays inside the 40x40 frame

The real files are not downloadable here, so `affnist_like` builds an affNIST-like test set from
the MNIST test digits with those ranges (seeded and fixed: the same images for every run); when
the real files are present (`find_affnist`: affNIST's `test.mat` or `test_batches/*.mat`),
`read_affnist` reads them instead. The models never see a transformation other than translation
in training (the paper: "never trained with affine transformations other than translation").

The paper reports each model stopped early when its expanded-MNIST test accuracy reached about
99.2%: CapsNet 79% on affNIST at 99.23%, the CNN 66% at 99.22%.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from capsfast import canvas
from capsfast.baseline import BaselineConfig
from capsfast.data import DataError
from capsfast.model import ModelConfig

SIZE = 40
PAD = 6
MAX_SHIFT = 6
ROTATION_DEG = (-20.0, 20.0)
SHEAR = (-0.2, 0.2)
SCALE = (0.8, 1.2)  # vertical and horizontal, drawn independently
TEST_SEED = 2_000  # the expanded test set and the affNIST-like set: the same for every run
AFFNIST_LIKE_PER_DIGIT = 1  # 10,000 images by default (affNIST's real test set: 32 per digit)
# streams of canvas.draw
_POSITION, _ROTATION, _SHEAR, _SCALE_Y, _SCALE_X, _TRANSLATE = range(6)

# The 40x40 CapsNet: a 12x12 grid of 32 primary capsule types (4,608 primary capsules),
# 13,475,808 parameters (11,228,064 without the decoder).
MODEL = ModelConfig(image_size=SIZE)
# The CNN of section 5.2 ("with MaxPooling and DropOut", shapes not given): the Table 1 layers
# with 2x2 max-pooling after the first two convolutions (capsfast.baseline), 6,728,466 parameters.
BASELINE = BaselineConfig(image_size=SIZE, pool_after=(0, 1))


def _digits(images: torch.Tensor) -> torch.Tensor:
    if images.dim() == 4:
        images = images[:, 0]
    if images.shape[1:] != (28, 28):
        raise ValueError(f"expected 28x28 MNIST digits; got images {tuple(images.shape)}")
    return images


def expanded(images: torch.Tensor, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """Expanded MNIST: the digits images[index] ([N, 28, 28] uint8) each at a random position of
    a 40x40 black canvas, a pure function of (seed, epoch, index). Returns [n, 1, 40, 40]."""
    images = _digits(images)
    index = index.to(images.device).long()
    h = canvas.draw(index, seed, epoch, _POSITION)
    dy = canvas.integers(h, -MAX_SHIFT, MAX_SHIFT)
    dx = canvas.integers(h >> 32, -MAX_SHIFT, MAX_SHIFT)
    return canvas.place(images[index], PAD + dy, PAD + dx, SIZE).unsqueeze(1)


def expanded_test_set(images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """The expanded MNIST test set: test digit i at its fixed position (TEST_SEED)."""
    n = images.shape[0] if size is None else min(size, images.shape[0])
    return expanded(images, torch.arange(n), TEST_SEED, 0)


# --------------------------------------------------------------------------- affNIST-like
def affine_parameters(index: torch.Tensor, seed: int = TEST_SEED) -> dict[str, torch.Tensor]:
    """Each image's transformation (float64 [n]): rotation in degrees, shear, vertical and
    horizontal scale, drawn uniformly over affNIST's ranges from (seed, index)."""
    h = {s: canvas.draw(index, seed, 0, s) for s in (_ROTATION, _SHEAR, _SCALE_Y, _SCALE_X)}
    return {
        "rotation_deg": canvas.uniform(h[_ROTATION], *ROTATION_DEG),
        "shear": canvas.uniform(h[_SHEAR], *SHEAR),
        "scale_y": canvas.uniform(h[_SCALE_Y], *SCALE),
        "scale_x": canvas.uniform(h[_SCALE_X], *SCALE),
    }


def linear_map(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """A [n, 2, 2] (float64) acting on (x, y) offsets from the image centre, y pointing down:
    scale first, then shear (x += shear * y), then rotate."""
    theta = p["rotation_deg"] * (math.pi / 180)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    one, zero = torch.ones_like(theta), torch.zeros_like(theta)
    shear = torch.stack([torch.stack([one, p["shear"]], -1), torch.stack([zero, one], -1)], -2)
    scale = torch.diag_embed(torch.stack([p["scale_x"], p["scale_y"]], -1))
    return rotate @ shear @ scale


def warp(images: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Apply A [n, 2, 2] about the centre of square uint8 images [n, S, S] (bilinear, black
    outside). Returns uint8 [n, S, S]."""
    n, S, _ = images.shape
    # grid_sample maps each output location to an input one: the inverse map, in coordinates
    # normalised to [-1, 1] (the same scale on both axes of a square image).
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, :, :2] = torch.linalg.inv(A)
    grid = F.affine_grid(theta, (n, 1, S, S), align_corners=False)
    x = images.unsqueeze(1).double()
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0].round().clamp(0, 255).to(torch.uint8)


def affnist_like(
    images: torch.Tensor, labels: torch.Tensor, size: int | None = None, seed: int = TEST_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """An affNIST-like test set from MNIST test digits ([N, 28, 28] uint8): image i is digit
    i mod N, centred in 40x40, transformed by its own random affine map (`affine_parameters`),
    then translated by a random integer offset that keeps all its ink inside the frame.
    Computed on the CPU in float64 (the same images on every machine). Returns uint8
    [n, 1, 40, 40] and labels [n]."""
    images, labels = _digits(images).cpu(), labels.cpu()
    n = images.shape[0] * AFFNIST_LIKE_PER_DIGIT if size is None else size
    index = torch.arange(n)
    source = index % images.shape[0]
    centred = F.pad(images[source], (PAD, PAD, PAD, PAD))
    warped = warp(centred, linear_map(affine_parameters(index, seed)))
    box = canvas.ink_boxes(warped)  # [n, (top, left, bottom, right)]
    h = canvas.draw(index, seed, 0, _TRANSLATE)
    dy = canvas.integers(h, -box[:, 0], SIZE - box[:, 2])
    dx = canvas.integers(h >> 32, -box[:, 1], SIZE - box[:, 3])
    return translate(warped, dy, dx).unsqueeze(1), labels[source]


def translate(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Move each image [n, S, S] by its own integer (dy, dx), filling with black."""
    n, S, _ = images.shape
    rows = torch.arange(S)[None, :] - dy[:, None]  # output row r shows input row r - dy
    cols = torch.arange(S)[None, :] - dx[:, None]
    inside = ((rows >= 0) & (rows < S))[:, :, None] & ((cols >= 0) & (cols < S))[:, None, :]
    out = images[
        torch.arange(n)[:, None, None],
        rows.clamp(0, S - 1)[:, :, None],
        cols.clamp(0, S - 1)[:, None, :],
    ]
    return out * inside


# --------------------------------------------------------------------------- the real files
def find_affnist(directory: str | Path | None) -> list[Path]:
    """affNIST's test files under `directory`, in order: `test.mat`, or the 32 batches
    `test_batches/1.mat` .. `32.mat` (also inside an `affNIST/` or `transformed/` folder).
    Empty when there are none."""
    if directory is None:
        return []
    root = Path(directory)
    for base in (root, root / "affNIST", root / "transformed"):
        if (base / "test.mat").is_file():
            return [base / "test.mat"]
        batches = sorted((base / "test_batches").glob("*.mat"), key=_batch_number)
        if batches:
            return batches
    return []


def _batch_number(path: Path):
    return (0, int(path.stem)) if path.stem.isdigit() else (1, path.stem)


def read_affnist(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read affNIST .mat files (MATLAB v5, a struct `affNISTdata` with `image`, 1600 x N uint8,
    one 40x40 image per column in row-major order, and `label_int`, N labels 0-9). Returns uint8
    [N, 1, 40, 40] and int64 labels [N]; a missing or malformed file is a one-line DataError."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("reading affNIST's .mat files needs scipy: pip install scipy") from None
    images, labels = [], []
    for path in paths:
        try:
            data = loadmat(str(path), squeeze_me=True, struct_as_record=True)["affNISTdata"]
            image, label = data["image"].item(), data["label_int"].item()
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise DataError(
                f"{path}: not an affNIST .mat file ({type(e).__name__}: {e}); expected a struct "
                "affNISTdata with fields image (1600 x N) and label_int"
            ) from None
        image = torch.as_tensor(image.reshape(1600, -1))
        label = torch.as_tensor(label).reshape(-1).long()
        if image.dtype != torch.uint8 or image.shape[1] != label.shape[0]:
            raise DataError(
                f"{path}: affNISTdata.image is {tuple(image.shape)} {image.dtype}, expected "
                f"uint8 1600 x {label.shape[0]} (one column per label)"
            )
        if len(label) and (int(label.min()) < 0 or int(label.max()) > 9):
            raise DataError(f"{path}: affNISTdata.label_int has labels outside 0-9")
        images.append(image.t().reshape(-1, 1, SIZE, SIZE))
        labels.append(label)
    if not images:
        raise DataError("no affNIST test files given")
    return torch.cat(images).contiguous(), torch.cat(labels)
