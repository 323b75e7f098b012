"""MNIST on the device: IDX reading, splits, per-sample shift augmentation, batching.

The whole training set lives on the training device as uint8 (about 55 MB with the test set);
shuffling, batching and the random shift run there too, so no DataLoader worker sits in the hot
path (the cifar10-airbench way). Every random choice is a pure function of (seed, epoch, sample):
the same seed gives the same permutation and the same shifts whatever the number of processes.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from capsfast.errors import UserError

# capsfast ships the original four IDX files, gzipped, as package data: the default data directory
# in a checkout and in an installed wheel alike.
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "assets" / "mnist"

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
COUNTS = {"train": 60000, "test": 10000}
# SHA-256 of the gzipped files as shipped in capsfast/assets/mnist (the original LeCun/Cun files).
SHIPPED_SHA256 = {
    "train-images-idx3-ubyte.gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "train-labels-idx1-ubyte.gz": "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    "t10k-images-idx3-ubyte.gz": "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    "t10k-labels-idx1-ubyte.gz": "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
}


class DataError(UserError):
    """Missing, truncated or corrupt MNIST files; the message says what to do."""


HOW_TO_PROVIDE = (
    "pass --data-dir DIR with the four MNIST IDX files (gzipped or not, e.g. "
    "train-images-idx3-ubyte.gz), or --download to fetch them through torchvision"
)


def _find(directory: Path, name: str) -> Path | None:
    # Original layout (DIR/name[.gz]) or torchvision's (DIR/MNIST/raw/name[.gz]).
    for base in (directory, directory / "MNIST" / "raw", directory / "raw"):
        for candidate in (base / name, base / (name + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def _read_idx(path: Path, kind: str, expected_count: int) -> torch.Tensor:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            if path.name in SHIPPED_SHA256 and path.parent == DEFAULT_DATA_DIR:
                digest = hashlib.sha256(raw).hexdigest()
                if digest != SHIPPED_SHA256[path.name]:
                    raise DataError(
                        f"{path}: SHA-256 {digest[:12]}... does not match the shipped copy; "
                        "restore it (`git checkout -- capsfast/assets/mnist` in a checkout, or reinstall "
                        "capsfast)"
                    )
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is truncated or corrupt") from None
    ndim = 3 if kind == "images" else 1
    magic = 0x0800 | ndim  # unsigned byte data, ndim dimensions
    if len(raw) < 4 + 4 * ndim or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path}: not an MNIST IDX {kind} file (bad header)")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    if dims[0] != expected_count or (ndim == 3 and dims[1:] != (28, 28)):
        raise DataError(f"{path}: header says shape {dims}, expected {expected_count} MNIST {kind}")
    size = 1
    for d in dims:
        size *= d
    payload = raw[4 + 4 * ndim :]
    if len(payload) != size:
        raise DataError(
            f"{path}: {len(payload)} data bytes, header promises {size}: the file is truncated "
            "or corrupt; replace it"
        )
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(*dims)


@dataclass
class MNIST:
    train_images: torch.Tensor  # [60000, 28, 28] uint8
    train_labels: torch.Tensor  # [60000] int64
    test_images: torch.Tensor  # [10000, 28, 28] uint8
    test_labels: torch.Tensor  # [10000] int64

    def to(self, device) -> MNIST:
        return MNIST(*(t.to(device) for t in vars(self).values()))


def load_mnist(data_dir: str | Path | None = None, download: bool = False) -> MNIST:
    """Read the four IDX files from `data_dir` (default: the copy shipped with capsfast)."""
    directory = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if download:
        try:
            from torchvision.datasets import MNIST as TVMNIST

            for train in (True, False):
                TVMNIST(str(directory), train=train, download=True)
        except Exception as e:  # network, disk: say what failed and what else to do
            raise DataError(f"--download into {directory} failed ({e}); {HOW_TO_PROVIDE}") from None
    if not directory.exists():
        raise DataError(f"data directory {directory} does not exist; {HOW_TO_PROVIDE}")
    if not directory.is_dir():
        raise DataError(f"--data-dir {directory} is a file, not a directory; {HOW_TO_PROVIDE}")
    tensors = {}
    for key, name in FILES.items():
        path = _find(directory, name)
        if path is None:
            raise DataError(f"{name}[.gz] not found in {directory}; {HOW_TO_PROVIDE}")
        split, kind = key.split("_")
        t = _read_idx(path, kind, COUNTS[split])
        tensors[key] = t if kind == "images" else t.long()
    if int(tensors["train_labels"].max()) > 9 or int(tensors["test_labels"].max()) > 9:
        raise DataError(f"labels in {directory} outside 0..9: the label files are corrupt")
    return MNIST(**tensors)


def split_train_val(mnist: MNIST, val_size: int, seed: int = 0):
    """Hold `val_size` training images out (a fixed, seeded choice) for checkpoint selection."""
    n = mnist.train_images.shape[0]
    if not 0 <= val_size < n:
        raise DataError(
            f"--val-size {val_size} leaves no training images: it must be below the {n:,} "
            "training images (0: no validation split)"
        )
    g = torch.Generator().manual_seed(10_007 + seed)
    order = torch.randperm(n, generator=g).to(mnist.train_images.device)
    val, train = order[:val_size], order[val_size:]
    return (
        (mnist.train_images[train], mnist.train_labels[train]),
        (mnist.train_images[val], mnist.train_labels[val]),
    )


def epoch_permutation(n: int, seed: int, epoch: int, device) -> torch.Tensor:
    """The order of epoch `epoch`: same on every rank and for every world size."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def _mix(x: torch.Tensor) -> torch.Tensor:
    # A 64-bit integer hash (splitmix64's finaliser, arithmetic wraps in int64): a counter-based
    # RNG, so a sample's shift depends on nothing but (seed, epoch, index).
    x = x ^ (x >> 31)
    x = x * 0x7FB5D329728EA185 & 0x7FFFFFFFFFFFFFFF
    x = x ^ (x >> 27)
    x = x * 0x81DADEF4BC2DD44D & 0x7FFFFFFFFFFFFFFF
    return x ^ (x >> 33)


def sample_shifts(
    indices: torch.Tensor, seed: int, epoch: int, max_shift: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample integer shifts (dy, dx) in [-max_shift, max_shift], from (seed, epoch, index)."""
    key = indices.long() * 2_654_435_761 + (seed * 1_000_003 + epoch) * 40_503 + 12_345
    h = _mix(_mix(key))
    span = 2 * max_shift + 1
    return (h % span) - max_shift, ((h >> 16) % span) - max_shift


def shift_images(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int):
    """Shift each image [N, 28, 28] by its own (dy, dx), filling with zeros (SPEC: zero padding)."""
    N, H, W = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = (torch.arange(H, device=images.device) + pad).unsqueeze(0) - dy.unsqueeze(1)
    cols = (torch.arange(W, device=images.device) + pad).unsqueeze(0) - dx.unsqueeze(1)
    n = torch.arange(N, device=images.device)[:, None, None]
    return padded[n, rows[:, :, None], cols[:, None, :]]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28] in [0, 1] (no mean/std normalisation: SPEC)."""
    return images.unsqueeze(1).float().div_(255.0)


class TrainBatches:
    """Shuffled, shifted batches of one rank's shard, straight from device tensors.

    Global batch G is split into world_size contiguous slices; rank r takes slice r of every
    global batch, so the union over ranks of step k is exactly the single-process batch of step k.
    The last partial global batch of an epoch is dropped.
    """

    def __init__(self, images, labels, global_batch, seed, max_shift, rank=0, world_size=1):
        if global_batch % world_size:
            raise DataError(
                f"--batch-size {global_batch} is the global batch and must be divisible by the "
                f"{world_size} processes"
            )
        self.images, self.labels = images, labels
        self.global_batch, self.local_batch = global_batch, global_batch // world_size
        self.seed, self.max_shift, self.rank = seed, max_shift, rank
        self.steps_per_epoch = images.shape[0] // global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"--batch-size {global_batch} is larger than the {images.shape[0]:,} training "
                "images (after the validation split): choose a smaller --batch-size"
            )

    def batch(self, epoch: int, step_in_epoch: int, order: torch.Tensor | None = None):
        """Batch `step_in_epoch` of `epoch` for this rank: (float images [b,1,28,28], labels)."""
        if order is None:
            order = epoch_permutation(self.images.shape[0], self.seed, epoch, self.images.device)
        start = step_in_epoch * self.global_batch + self.rank * self.local_batch
        idx = order[start : start + self.local_batch]
        x = self.images[idx]
        if self.max_shift > 0:
            dy, dx = sample_shifts(idx, self.seed, epoch, self.max_shift)
            x = shift_images(x, dy, dx, self.max_shift)
        return to_float(x), self.labels[idx]
