"""The data layer: a data set is uint8 images [N, C, H, W] + int64 labels + class names, for train
and test; splits, on-device augmentation and batching; MNIST's IDX files (the shipped default).

The whole training set lives on the training device as uint8 (MNIST: about 55 MB with the test
set); shuffling, batching and augmentation run there too, so no DataLoader worker sits in the hot
path (the cifar10-airbench way). A data set too large for the device stays in host memory and is
streamed to it in chunks (`HostChunks`, `choose_placement`). Every random choice is a pure
function of (seed, epoch, sample index): the same seed gives the same permutation, shifts, crops
and flips whatever the number of processes, resident or streamed.

Readers of the other data sets (Fashion-MNIST, KMNIST, EMNIST, CIFAR-10, SVHN, image folders) are
in capsfast/datasets.py; they share the IDX reader here.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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
# SHA-256 of the gzipped files as shipped in capsfast/assets/mnist (the original LeCun/Cun files).
SHIPPED_SHA256 = {
    "train-images-idx3-ubyte.gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "train-labels-idx1-ubyte.gz": "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    "t10k-images-idx3-ubyte.gz": "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    "t10k-labels-idx1-ubyte.gz": "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
}
# torchvision.datasets.MNIST.classes (tests/test_datasets.py checks the copy): the class names of
# MNIST, and of any exported model that predates class names.
MNIST_CLASSES = ("0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five",
                 "6 - six", "7 - seven", "8 - eight", "9 - nine")  # fmt: skip
# How predict turns a picture into a model input (capsfast/infer.py), per kind of data set:
#   mnist  one grey digit or character, light on dark, its box scaled to 20x20 and centred by
#          mass in 28x28 (how MNIST, KMNIST and EMNIST were made)
#   fit    one grey object, light on dark, its box scaled to fill the frame (Fashion-MNIST)
#   photo  RGB (or grey) photo: shorter side resized, centre crop (CIFAR-10, SVHN, folders)
INPUT_STYLES = ("mnist", "fit", "photo")


class DataError(UserError, ValueError):
    """Missing, truncated or corrupt data files, or unusable data; the message says what to do."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line: `Type: message`, whitespace (torchvision's download
    errors span lines: one per mirror tried) collapsed."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


HOW_TO_PROVIDE = (
    "pass --data-dir DIR with the four MNIST IDX files (gzipped or not, e.g. "
    "train-images-idx3-ubyte.gz), or --download to fetch them through torchvision"
)


# --------------------------------------------------------------------------- the data set type
@dataclass
class Dataset:
    """One data set, train and test, as uint8 images [N, C, H, W] (square) and int64 labels.

    `flips`: whether a horizontal flip keeps the class (natural images; never digits or letters).
    `style`: how predict prepares a picture for a model of this data (INPUT_STYLES). Images
    given as [N, H, W] are one-channel and stored as [N, 1, H, W].
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...] = MNIST_CLASSES
    name: str = "mnist"
    style: str = "mnist"
    flips: bool = False

    def __post_init__(self):
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dim() == 3:
                images = images.unsqueeze(1)
            if images.dim() != 4 or images.dtype != torch.uint8:
                raise DataError(
                    f"{self.name}: {split} images must be uint8 [N, C, H, W], got "
                    f"{images.dtype} {tuple(images.shape)}"
                )
            if labels.shape != images.shape[:1]:
                raise DataError(
                    f"{self.name}: {images.shape[0]:,} {split} images but {labels.numel():,} labels"
                )
            setattr(self, f"{split}_images", images)
            setattr(self, f"{split}_labels", labels.long())
        shape, test_shape = self.train_images.shape[1:], self.test_images.shape[1:]
        if shape != test_shape or shape[1] != shape[2]:
            raise DataError(
                f"{self.name}: train images are {tuple(shape)}, test images {tuple(test_shape)}: "
                "both must be the same square size"
            )
        self.class_names = tuple(str(c) for c in self.class_names)
        if self.style not in INPUT_STYLES:
            raise ValueError(f"Dataset.style must be one of {INPUT_STYLES}, got {self.style!r}")

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def nbytes(self) -> int:
        """Bytes of the images (train and test): what keeping the set on a device costs."""
        return self.train_images.nbytes + self.test_images.nbytes

    def to(self, device) -> Dataset:
        tensors = ("train_images", "train_labels", "test_images", "test_labels")
        moved = {k: getattr(self, k).to(device) for k in tensors}
        return Dataset(**moved, class_names=self.class_names, name=self.name, style=self.style,
                       flips=self.flips)  # fmt: skip


MNIST = Dataset  # the name callers used before there were other data sets


# --------------------------------------------------------------------------- IDX files
def find_file(directory: Path, name: str, subdirs=("MNIST/raw", "raw")) -> Path | None:
    """DIR/name[.gz], or in one of torchvision's layouts (DIR/<subdir>/name[.gz])."""
    for base in (directory, *(directory / s for s in subdirs)):
        for candidate in (base / name, base / (name + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: Path, kind: str, expected_count: int | None = None) -> torch.Tensor:
    """An IDX file of unsigned bytes: images [N, H, W] (kind "images") or labels [N] ("labels").
    The payload must be exactly what the header promises; the shipped MNIST copy must also match
    its SHA-256."""
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
        raise DataError(f"{path}: not an IDX {kind} file of bytes (bad header)")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    if dims[0] == 0 or 0 in dims[1:]:
        raise DataError(f"{path}: the header says {' x '.join(map(str, dims))} {kind}: the file "
                        "holds no data; replace it")  # fmt: skip
    if expected_count is not None and dims[0] != expected_count:
        raise DataError(f"{path}: header says {dims[0]:,} {kind}, expected {expected_count:,}")
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


def read_idx_set(directory: Path, files: dict[str, str], subdirs, how_to_provide: str) -> dict:
    """The four IDX files named by `files` (FILES' keys) -> {key: tensor}; images [N, H, W],
    labels int64; a file missing, corrupt or disagreeing with its partner is a DataError."""
    tensors = {}
    for key, name in files.items():
        path = find_file(directory, name, subdirs)
        if path is None:
            raise DataError(f"{name}[.gz] not found in {directory}; {how_to_provide}")
        kind = key.split("_")[1]
        t = read_idx(path, kind)
        tensors[key] = t if kind == "images" else t.long()
    for split in ("train", "test"):
        n_img, n_lab = len(tensors[f"{split}_images"]), len(tensors[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(
                f"{files[f'{split}_images']} holds {n_img:,} images but "
                f"{files[f'{split}_labels']} {n_lab:,} labels in {directory}: one is from "
                "another copy; replace both"
            )
    return tensors


def check_labels(dataset: Dataset, where) -> Dataset:
    """Every label names a class (a corrupt label file shows up here, not as a CUDA assert)."""
    k = dataset.num_classes
    for split in ("train", "test"):
        labels = getattr(dataset, f"{split}_labels")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise DataError(
                f"{split} labels in {where} outside 0..{k - 1} ({dataset.name} has {k} classes): "
                "the label files are corrupt"
            )
    return dataset


def load_mnist(data_dir: str | Path | None = None, download: bool = False) -> Dataset:
    """Read the four IDX files from `data_dir` (default: the copy shipped with capsfast)."""
    directory = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if download:
        try:
            from torchvision.datasets import MNIST as TVMNIST

            for train in (True, False):
                TVMNIST(str(directory), train=train, download=True)
        except Exception as e:  # network, disk: say what failed and what else to do
            raise DataError(
                f"--download into {directory} failed ({one_line(e)}); {HOW_TO_PROVIDE}"
            ) from None
    if not directory.exists():
        raise DataError(f"data directory {directory} does not exist; {HOW_TO_PROVIDE}")
    if not directory.is_dir():
        raise DataError(f"--data-dir {directory} is a file, not a directory; {HOW_TO_PROVIDE}")
    tensors = read_idx_set(directory, FILES, ("MNIST/raw", "raw"), HOW_TO_PROVIDE)
    return check_labels(Dataset(**tensors), directory)


# --------------------------------------------------------------------------- splits
def split_train_val(data: Dataset, val_size: int, seed: int = 0):
    """Hold `val_size` training images out (a fixed, seeded choice) for checkpoint selection."""
    n = data.train_images.shape[0]
    if not 0 <= val_size < n:
        raise DataError(
            f"--val-size {val_size} leaves no training images: it must be below the {n:,} "
            "training images (0: no validation split)"
        )
    g = torch.Generator().manual_seed(10_007 + seed)
    order = torch.randperm(n, generator=g).to(data.train_images.device)
    val, train = order[:val_size], order[val_size:]
    return (
        (data.train_images[train], data.train_labels[train]),
        (data.train_images[val], data.train_labels[val]),
    )


def default_val_size(val_size: int, n_train: int) -> int:
    """--val-size, at most a tenth of the training images (a small folder still trains)."""
    return min(val_size, n_train // 10)


def epoch_permutation(n: int, seed: int, epoch: int, device) -> torch.Tensor:
    """The order of epoch `epoch`: same on every rank and for every world size."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


# --------------------------------------------------------------------------- augmentation
def _mix(x: torch.Tensor) -> torch.Tensor:
    # A 64-bit integer hash (splitmix64's finaliser, arithmetic wraps in int64): a counter-based
    # RNG, so a sample's shift depends on nothing but (seed, epoch, index).
    x = x ^ (x >> 31)
    x = x * 0x7FB5D329728EA185 & 0x7FFFFFFFFFFFFFFF
    x = x ^ (x >> 27)
    x = x * 0x81DADEF4BC2DD44D & 0x7FFFFFFFFFFFFFFF
    return x ^ (x >> 33)


def _sample_hash(indices: torch.Tensor, seed: int, epoch: int, stream: int) -> torch.Tensor:
    """63 random bits per sample from (seed, epoch, index); `stream` separates the choices (0:
    shifts, 1: crops, 2: flips), so adding a crop leaves the shifts of a run as they were."""
    key = indices.long() * 2_654_435_761 + (seed * 1_000_003 + epoch) * 40_503 + 12_345
    return _mix(_mix(key + stream * 0x9E3779B97F4A7C1))


def sample_shifts(
    indices: torch.Tensor, seed: int, epoch: int, max_shift: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample integer shifts (dy, dx) in [-max_shift, max_shift], from (seed, epoch, index)."""
    h = _sample_hash(indices, seed, epoch, 0)
    span = 2 * max_shift + 1
    return (h % span) - max_shift, ((h >> 16) % span) - max_shift


def sample_crops(
    indices: torch.Tensor, seed: int, epoch: int, slack: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample crop corners (top, left) in [0, slack] (slack = image size - crop size)."""
    h = _sample_hash(indices, seed, epoch, 1)
    return h % (slack + 1), (h >> 16) % (slack + 1)


def sample_flips(indices: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """Per-sample horizontal flip (bool), probability 1/2."""
    return (_sample_hash(indices, seed, epoch, 2) >> 20) & 1 == 1


def _windows(images: torch.Tensor, top, left, size: int, pad: int) -> torch.Tensor:
    """Per-sample size x size windows of [N, C, H, W] images zero-padded by `pad` on each side,
    window n starting at (top[n], left[n]) of the padded image: one gather for shifts and crops."""
    N = images.shape[0]
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    steps = torch.arange(size, device=images.device)
    rows = top.unsqueeze(1) + steps  # [N, size]
    cols = left.unsqueeze(1) + steps
    n = torch.arange(N, device=images.device)[:, None, None]
    # Advanced indices around the channel slice put the channel last: [N, size, size, C].
    return padded[n, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def shift_images(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int):
    """Shift each image [N, (C,) H, W] by its own (dy, dx), filling with zeros (SPEC: zero
    padding); `pad` >= the largest shift."""
    x = images.unsqueeze(1) if images.dim() == 3 else images
    out = _windows(x, pad - dy, pad - dx, x.shape[-1], pad)
    return out.squeeze(1) if images.dim() == 3 else out


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size window of [..., H, W] (as evaluation sees a crop-trained model)."""
    H, W = images.shape[-2:]
    top, left = (H - size) // 2, (W - size) // 2
    return images[..., top : top + size, left : left + size]


def augment(images, indices, seed: int, epoch: int, max_shift=0, crop=0, flip=False):
    """The training augmentation of uint8 images [N, C, H, W] with sample indices `indices`:
    a random crop of `crop` pixels (0: none), a random shift of up to `max_shift` pixels with zero
    fill (the paper's MNIST recipe), a random horizontal flip; each a pure function of (seed,
    epoch, index). Returns uint8 [N, C, crop or H, crop or W]."""
    N, _, H, _ = images.shape
    size = crop or H
    x = images
    if crop or max_shift:
        top = torch.zeros(N, dtype=torch.long, device=images.device)
        left = torch.zeros_like(top)
        if crop:
            oy, ox = sample_crops(indices, seed, epoch, H - crop)
            top, left = top + oy, left + ox
        if max_shift:
            dy, dx = sample_shifts(indices, seed, epoch, max_shift)
            top, left = top + max_shift - dy, left + max_shift - dx
        x = _windows(images, top, left, size, max_shift)
    if flip:
        flipped = sample_flips(indices, seed, epoch).view(N, 1, 1, 1)
        x = torch.where(flipped, x.flip(-1), x)
    return x


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] (or [N, H, W]: one channel) -> float [N, C, H, W] in [0, 1] (no
    mean/std normalisation: SPEC; the decoder reconstructs pixels in [0, 1])."""
    x = images.unsqueeze(1) if images.dim() == 3 else images
    return x.float().div_(255.0)


# --------------------------------------------------------------------------- placement
# A data set stays in host memory and is streamed to the GPU when its images (uint8, train,
# validation and test) need more than this fraction of the GPU memory free at start: the rest is
# the model's (weights, optimiser state, activations, which grow with batch and image size).
DEVICE_DATA_FRACTION = 0.25
STREAM_CHUNK_BYTES = 64 << 20  # host -> device transfers of about this size


def choose_placement(requested: str, data_bytes: int, device_type: str, free_bytes: int | None):
    """'device' (resident) or 'stream' (host memory, chunks copied to the device while training).

    requested: device or stream, used as given; auto: stream on CUDA when data_bytes exceeds
    DEVICE_DATA_FRACTION of free_bytes (the GPU's free memory), else device. On a CPU the host
    memory is the device's, so auto keeps everything resident.
    """
    if requested in ("device", "stream"):
        return requested
    if requested != "auto":
        raise ValueError(f"--data-placement must be auto, device or stream, got {requested!r}")
    if device_type != "cuda" or free_bytes is None:
        return "device"
    return "stream" if data_bytes > DEVICE_DATA_FRACTION * free_bytes else "device"


class HostChunks:
    """A rank's training rows, in host memory, moved to the device a chunk of steps at a time.

    A chunk is this rank's slices of `chunk_steps` consecutive global batches, gathered on the
    host (in the epoch's order) into a pinned buffer and copied in one non-blocking transfer on a
    side stream; the next chunk's copy starts when the current one is first used, so it overlaps
    training. Two pinned buffers alternate; a buffer is refilled only after its copy finished.
    """

    def __init__(self, images, labels, device, seed, global_batch, local_batch, rank,
                 steps_per_epoch):  # fmt: skip
        self.images, self.labels = images.cpu(), labels.cpu()
        self.device, self.seed = torch.device(device), seed
        self.global_batch, self.local_batch, self.rank = global_batch, local_batch, rank
        self.steps_per_epoch = steps_per_epoch
        row_bytes = local_batch * images[0].numel()
        self.chunk_steps = max(1, min(steps_per_epoch, STREAM_CHUNK_BYTES // row_bytes))
        self.cuda = self.device.type == "cuda"
        rows = self.chunk_steps * local_batch
        self.buffers = [torch.empty((rows, *images.shape[1:]), dtype=torch.uint8,
                                    pin_memory=self.cuda) for _ in range(2)]  # fmt: skip
        self.copied = [None, None]  # the event of each buffer's last copy
        self.slot = 0  # the buffer the next chunk is gathered into
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.orders: dict[int, torch.Tensor] = {}
        self.loaded: dict[tuple[int, int], tuple] = {}  # (epoch, chunk) -> (x, idx, y, event)

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self.orders:
            self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1}
            self.orders[epoch] = epoch_permutation(len(self.images), self.seed, epoch, "cpu")
        return self.orders[epoch]

    def _load(self, epoch: int, chunk: int):
        first = chunk * self.chunk_steps
        steps = range(first, min(first + self.chunk_steps, self.steps_per_epoch))
        order = self._order(epoch)
        starts = [k * self.global_batch + self.rank * self.local_batch for k in steps]
        idx = torch.cat([order[s : s + self.local_batch] for s in starts])
        slot, self.slot = self.slot, 1 - self.slot
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # that buffer's previous copy has left it
        buf = self.buffers[slot][: len(idx)]
        torch.index_select(self.images, 0, idx, out=buf)
        if not self.cuda:
            self.loaded[(epoch, chunk)] = (buf.clone(), idx, self.labels[idx], None)
            return
        # Allocated on the training stream, which uses them (the side stream only writes them
        # before the event that the training stream waits for).
        x = torch.empty(buf.shape, dtype=torch.uint8, device=self.device)
        idx_d = torch.empty(idx.shape, dtype=idx.dtype, device=self.device)
        y = torch.empty(idx.shape, dtype=self.labels.dtype, device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            x.copy_(buf, non_blocking=True)
            idx_d.copy_(idx)
            y.copy_(self.labels[idx])
            event = torch.cuda.Event()
            event.record(self.stream)
        self.copied[slot] = event
        self.loaded[(epoch, chunk)] = (x, idx_d, y, event)

    def rows(self, epoch: int, step_in_epoch: int):
        """(uint8 images, sample indices, labels) of this rank's slice of step `step_in_epoch`,
        on the device."""
        chunk, offset = divmod(step_in_epoch, self.chunk_steps)
        key = (epoch, chunk)
        if key not in self.loaded:
            self._load(epoch, chunk)
        x, idx, y, event = self.loaded[key]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        if offset == 0:  # first use of this chunk: drop older ones, start the next copy
            self.loaded = {k: v for k, v in self.loaded.items() if k >= key}
            last = (chunk + 1) * self.chunk_steps >= self.steps_per_epoch
            nxt = (epoch + 1, 0) if last else (epoch, chunk + 1)
            if nxt not in self.loaded:
                self._load(*nxt)
        rows = slice(offset * self.local_batch, (offset + 1) * self.local_batch)
        return x[rows], idx[rows], y[rows]


# --------------------------------------------------------------------------- batches
class TrainBatches:
    """Shuffled, augmented batches of one rank's shard, straight from device tensors (or streamed
    from host memory in chunks: `stream=True`, with `device` the training device).

    Global batch G is split into world_size contiguous slices; rank r takes slice r of every
    global batch, so the union over ranks of step k is exactly the single-process batch of step k.
    The last partial global batch of an epoch is dropped. Resident and streamed batches are equal.
    """

    def __init__(self, images, labels, global_batch, seed, max_shift, rank=0, world_size=1,
                 crop=0, flip=False, stream=False, device=None):  # fmt: skip
        if global_batch % world_size:
            raise DataError(
                f"--batch-size {global_batch} is the global batch and must be divisible by the "
                f"{world_size} processes"
            )
        images = images.unsqueeze(1) if images.dim() == 3 else images
        if crop > images.shape[-1]:
            raise DataError(f"--crop {crop} is larger than the {images.shape[-1]}-pixel images")
        self.images, self.labels = images, labels
        self.global_batch, self.local_batch = global_batch, global_batch // world_size
        self.seed, self.max_shift, self.rank = seed, max_shift, rank
        self.crop, self.flip = crop, flip
        self.steps_per_epoch = images.shape[0] // global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"--batch-size {global_batch} is larger than the {images.shape[0]:,} training "
                "images (after the validation split): choose a smaller --batch-size"
            )
        self.chunks = None
        if stream:
            device = images.device if device is None else device
            self.chunks = HostChunks(images, labels, device, seed, global_batch,
                                     self.local_batch, rank, self.steps_per_epoch)  # fmt: skip

    def batch(self, epoch: int, step_in_epoch: int, order: torch.Tensor | None = None):
        """Batch `step_in_epoch` of `epoch` for this rank: (float images [b, C, S, S], labels).
        `order`: the epoch's permutation on the data's device, if the caller has it (streamed
        data computes its own on the host)."""
        if self.chunks is not None:
            x, idx, y = self.chunks.rows(epoch, step_in_epoch)
        else:
            if order is None:
                order = epoch_permutation(self.images.shape[0], self.seed, epoch,
                                          self.images.device)  # fmt: skip
            start = step_in_epoch * self.global_batch + self.rank * self.local_batch
            idx = order[start : start + self.local_batch]
            x, y = self.images[idx], self.labels[idx]
        x = augment(x, idx, self.seed, epoch, self.max_shift, self.crop, self.flip)
        return to_float(x), y
