"""Which data set, read from which files: `--dataset NAME` -> a capsfast.data.Dataset.

    mnist                 the copy shipped with capsfast (or --data-dir), IDX
    fashion-mnist, kmnist IDX, DIR/FashionMNIST/raw/*, DIR/KMNIST/raw/* (or the files in DIR)
    emnist-<split>        IDX, DIR/EMNIST/raw/emnist-<split>-*; split: byclass, bymerge,
                          balanced, letters, digits, mnist (EMNIST stores images transposed)
    cifar10               DIR/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)
    svhn                  DIR/train_32x32.mat, DIR/test_32x32.mat
    folder:PATH           PATH/train/<class>/*, PATH/test/<class>/*; or PATH/<class>/* with a
                          seeded test fraction held out per class; any image Pillow reads

DIR is --data-dir (default: ./data, torchvision's usual root; MNIST: the shipped copy). The
layouts are torchvision's, so `--download` (torchvision's downloaders) and these readers agree;
the files are read here, not through torchvision's dataset classes, whose MD5 checks would refuse
a user's own copy or a test's small generated files. Class names are torchvision's `classes` (the
folder names for folder:). Everything is uint8 [N, C, H, W] in host memory; the trainer moves it.
"""

from __future__ import annotations

import os
import pickle
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from capsfast.data import (
    DataError,
    Dataset,
    check_labels,
    find_file,
    load_mnist,
    one_line,
    read_idx_set,
)

EMNIST_SPLITS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")
NAMES = ("mnist", "fashion-mnist", "kmnist", *(f"emnist-{s}" for s in EMNIST_SPLITS), "cifar10",
         "svhn", "folder:DIR")  # fmt: skip
DEFAULT_ROOT = Path("data")  # torchvision's usual root, relative to the working directory
FOLDER_IMAGE_SIZE = 32  # folder: images are resized to this square size unless --image-size
FOLDER_TEST_SEED = 0  # the held-out test images of a one-tree folder do not depend on --seed

IDX_NAMES = {  # name -> (torchvision class and folder, predict's input style)
    "fashion-mnist": ("FashionMNIST", "fit"),
    "kmnist": ("KMNIST", "mnist"),
    "emnist": ("EMNIST", "mnist"),
}


def parse_name(name: str) -> tuple[str, str | None]:
    """'emnist-letters' -> ('emnist', 'letters'); 'folder:PATH' -> ('folder', 'PATH'); a name
    not in NAMES is a ValueError that lists them."""
    if name.startswith("folder:"):
        path = name[len("folder:") :]
        if not path:
            raise ValueError("--dataset folder: needs a directory: --dataset folder:DIR")
        return "folder", path
    if name.startswith("emnist-") and name[len("emnist-") :] in EMNIST_SPLITS:
        return "emnist", name[len("emnist-") :]
    if name in ("mnist", "fashion-mnist", "kmnist", "cifar10", "svhn"):
        return name, None
    raise ValueError(f"unknown --dataset {name!r}: choose one of {', '.join(NAMES)}")


def load_dataset(name: str, data_dir=None, download: bool = False, image_size: int | None = None,
                 test_fraction: float = 0.2, warn=None) -> Dataset:  # fmt: skip
    """The data set `name` (NAMES) from `data_dir`, fetched first with `download` if its files
    are missing; `image_size` and `test_fraction` apply to folder: data sets; `warn(message)`
    reports skipped unreadable images (default: stderr)."""
    family, arg = parse_name(name)
    warn = warn or (lambda message: print(f"capsfast: warning: {message}", file=sys.stderr))
    if family == "mnist":
        return load_mnist(data_dir, download=download)
    if family == "folder":
        return load_folder(arg, image_size or FOLDER_IMAGE_SIZE, test_fraction, warn)
    root = Path(data_dir) if data_dir is not None else DEFAULT_ROOT
    if root.exists() and not root.is_dir():
        raise DataError(f"--data-dir {root} is a file, not a directory; {_how(name, root)}")
    if family in IDX_NAMES:
        return _load_idx(family, arg, name, root, download)
    if family == "cifar10":
        return _load_cifar10(root, download)
    return _load_svhn(root, download)


def _how(name: str, root: Path) -> str:
    return (f"pass --data-dir DIR with the {name} files in torchvision's layout, or --download "
            f"to fetch them through torchvision into {root}")  # fmt: skip


def _download(name: str, root: Path, fetch) -> None:
    """Run torchvision's downloader `fetch()`; any failure (network, disk) in one line."""
    try:
        fetch()
    except Exception as e:
        raise DataError(
            f"--download of {name} into {root} failed ({one_line(e)}); put the files "
            f"there yourself (torchvision's layout) and pass --data-dir"
        ) from None


# --------------------------------------------------------------------------- the IDX family
def _idx_files(family: str, split: str | None) -> dict:
    if family != "emnist":
        return {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}  # fmt: skip
    return {f"{s}_{kind}": f"emnist-{split}-{s}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
            for s in ("train", "test") for kind in ("images", "labels")}  # fmt: skip


def _load_idx(family: str, split: str | None, name: str, root: Path, download: bool) -> Dataset:
    import torchvision.datasets as tv

    folder, style = IDX_NAMES[family]
    files = _idx_files(family, split)
    subdirs = (f"{folder}/raw", "raw")
    if download and any(find_file(root, f, subdirs) is None for f in files.values()):
        kwargs = {"split": split} if family == "emnist" else {}
        cls = getattr(tv, folder)
        _download(name, root, lambda: cls(str(root), train=True, download=True, **kwargs))
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; {_how(name, root)}")
    tensors = read_idx_set(root, files, subdirs, _how(name, root))
    if family == "emnist":  # stored transposed (column-major); upright like MNIST
        for key in ("train_images", "test_images"):
            tensors[key] = tensors[key].transpose(1, 2).contiguous()
        classes = tv.EMNIST.classes_split_dict[split]
    else:
        classes = getattr(tv, folder).classes
    data = Dataset(**tensors, class_names=tuple(classes), name=name, style=style)
    return check_labels(data, root)


# --------------------------------------------------------------------------- CIFAR-10
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def _unpickle(path: Path) -> dict:
    # Python pickles, as CIFAR-10 ships them (and as torchvision reads them): only read files you
    # trust, like any pickle.
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as e:  # whatever a damaged pickle makes the unpickler raise
        raise DataError(
            f"{path}: not a CIFAR-10 batch ({one_line(e)}); the file is truncated or "
            "corrupt: replace it (or --download into an empty --data-dir)"
        ) from None


def _cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    batch = _unpickle(path)
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = torch.as_tensor(np.asarray(batch["labels"], dtype=np.int64))
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{path}: not a CIFAR-10 batch (no 32x32x3 'data' and 'labels': {e}); replace it"
        ) from None
    return images, labels


def _load_cifar10(root: Path, download: bool) -> Dataset:
    from torchvision.datasets import CIFAR10

    directory = root / CIFAR10_DIR
    needed = (*CIFAR10_TRAIN, "test_batch")
    if download and not all((directory / f).is_file() for f in needed):
        _download("cifar10", root, lambda: CIFAR10(str(root), train=True, download=True))
    missing = [f for f in needed if not (directory / f).is_file()]
    if missing:
        raise DataError(f"{', '.join(missing)} not found in {directory}; {_how('cifar10', root)}")
    parts = [_cifar_batch(directory / f) for f in CIFAR10_TRAIN]
    test_x, test_y = _cifar_batch(directory / "test_batch")
    meta = directory / "batches.meta"  # the class names, as torchvision reads them
    classes = tuple(_unpickle(meta).get("label_names", ())) if meta.is_file() else ()
    train_x, train_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    data = Dataset(train_x, train_y, test_x, test_y, class_names=classes or CIFAR10_CLASSES,
                   name="cifar10", style="photo", flips=True)  # fmt: skip
    return check_labels(data, directory)


# What batches.meta lists (torchvision's CIFAR10 reads its classes from it): used without it.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")  # fmt: skip


# --------------------------------------------------------------------------- SVHN
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def _svhn_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
        x, y = np.asarray(mat["X"], dtype=np.uint8), np.asarray(mat["y"], dtype=np.int64)
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
            raise ValueError(f"X is {x.shape} and y {y.shape}, expected [32, 32, 3, N] and [N, 1]")
    except Exception as e:  # whatever a damaged file makes loadmat raise (IndexError, ValueError..)
        raise DataError(
            f"{path}: not an SVHN .mat file ({one_line(e)}); the file is truncated or "
            "corrupt: replace it (or --download into an empty --data-dir)"
        ) from None
    labels = y.reshape(-1) % 10  # SVHN labels the digit 0 as 10 (torchvision maps it to 0 too)
    images = np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))  # [N, C, H, W]
    return torch.from_numpy(images), torch.from_numpy(labels)


def _load_svhn(root: Path, download: bool) -> Dataset:
    import torchvision.datasets as tv

    for split, name in SVHN_FILES.items():
        if download and not (root / name).is_file():
            _download("svhn", root, lambda s=split: tv.SVHN(str(root), split=s, download=True))
    missing = [n for n in SVHN_FILES.values() if not (root / n).is_file()]
    if missing:
        raise DataError(f"{', '.join(missing)} not found in {root}; {_how('svhn', root)}")
    train_x, train_y = _svhn_split(root / SVHN_FILES["train"])
    test_x, test_y = _svhn_split(root / SVHN_FILES["test"])
    digits = tuple(str(d) for d in range(10))
    data = Dataset(
        train_x, train_y, test_x, test_y, class_names=digits, name="svhn", style="photo"
    )  # house numbers: flipping a digit changes what it reads
    return check_labels(data, root)


# --------------------------------------------------------------------------- image folders
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


# The most pixels a picture may have (PIL's own default limit, 89.5 megapixels: a 108 MP camera's
# full frame is over it, a 48 MP one is under). Over it, the header is enough to refuse the file:
# nothing is decoded. Decoding such a file would take gigabytes (a 13000x13000 PNG: 3.5 GB).
MAX_PIXELS = 89_478_485


class ImageTooLarge(ValueError):
    """A picture over MAX_PIXELS; the message says its size and what to do."""


def too_large(pixels: int, size: str = "") -> ImageTooLarge:
    return ImageTooLarge(
        f"too large to decode safely: {size}{pixels / 1e6:,.1f} megapixels, over the limit of "
        f"{MAX_PIXELS / 1e6:.1f} megapixels (a guard against decompression bombs): downscale "
        "it first"
    )


@contextmanager
def open_limited(path):
    """`PIL.Image.open(path)` that refuses, from the header alone, a picture of more than
    MAX_PIXELS pixels (ImageTooLarge), whatever PIL.Image.MAX_IMAGE_PIXELS says; PIL's own
    DecompressionBombWarning is not shown (this is the one guard)."""
    import re
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as e:  # over twice PIL's limit: PIL refuses it itself
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise too_large(int(found.group(1)) if found else 2 * MAX_PIXELS) from None
    with img:
        if img.width * img.height > MAX_PIXELS:
            raise too_large(img.width * img.height, f"{img.width}x{img.height} pixels, ")
        yield img


def image_extensions() -> set[str]:
    """The file suffixes Pillow opens (lower case, with the dot)."""
    from PIL import Image

    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def image_to_tensor(img, channels: int, size: int) -> torch.Tensor:
    """A PIL image -> uint8 [channels, size, size]: 16-bit and float modes to 8 bits, alpha
    composited onto white, RGB or grey, the shorter side resized and the centre cropped to a
    square (PIL's ImageOps.fit). The same function prepares training images and, at predict
    time, a user's picture for a photo-style model (capsfast/infer.py)."""
    import numpy as np
    from PIL import Image, ImageOps

    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img).astype(np.float64)
        a = a / 257.0 if img.mode.startswith("I;16") else a
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    img = img.convert("RGB" if channels == 3 else "L")
    img = ImageOps.fit(img, (size, size), method=Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    a = a[:, :, None] if a.ndim == 2 else a
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _files_by_class(root: Path, classes: list[str], where: str, warn) -> dict[str, list[Path]]:
    """The image files of each class folder, at any depth, each file once and under its real
    path. Links are not followed: a link to a folder could loop (repeating the tree without end)
    or lead into another class (labelling its images twice); a link to a file inside the class
    folders names a file read where it really is, and one out of them leads to images that are
    not part of the data set (a test image linked into train/, say). Every link skipped (and any
    file met twice) is counted in one warning that names the first few; a broken link is left
    to the decoder, which counts it as unreadable."""
    extensions = image_extensions()
    trees = [os.path.realpath(root / c) for c in classes]
    top = os.path.realpath(root)

    def within(outer: str, inner: str) -> bool:  # is `inner` `outer` or below it?
        return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)

    def in_tree(real: str) -> bool:
        return any(within(tree, real) for tree in trees)

    skipped: list[str] = []
    seen: set[str] = set()
    files: dict[str, list[Path]] = {c: [] for c in classes}
    for c, tree in zip(classes, trees, strict=True):
        if within(tree, top):  # root/c leads back to the data set's folder (or above): a loop
            skipped.append(f"{root / c} -> {os.readlink(root / c)} (a loop)")
            continue
        for here, dirs, names in sorted(os.walk(root / c, followlinks=False)):
            real_here = os.path.realpath(here)
            for name in sorted(dirs):  # os.walk lists links to folders here and never enters them
                path = os.path.join(here, name)
                if os.path.islink(path):
                    real = os.path.realpath(path)
                    why = ("a loop" if within(real, real_here)
                           else "its files are read where they are" if in_tree(real)
                           else "out of the class folders")  # fmt: skip
                    skipped.append(f"{path} -> {os.readlink(path)} ({why})")
            for name in sorted(names):
                path = os.path.join(here, name)
                if name.startswith(".") or Path(name).suffix.lower() not in extensions:
                    continue
                real = os.path.realpath(path)
                if os.path.islink(path) and os.path.exists(path):  # a broken link: unreadable
                    why = ("the file is read where it is" if in_tree(real)
                           else "out of the class folders")  # fmt: skip
                    skipped.append(f"{path} -> {os.readlink(path)} ({why})")
                    continue
                if real in seen:  # two class folders that are one folder
                    skipped.append(f"{path} (read already under another name)")
                    continue
                seen.add(real)
                files[c].append(Path(path))
    if skipped:
        shown = "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        warn(f"{where}: skipped {len(skipped)} symbolic link{'s' if len(skipped) > 1 else ''} or "
             "repeated files (each image is read once, under its real path; links are not "
             f"followed into a loop or out of the class folders): {shown}")  # fmt: skip
    empty = [c for c in classes if not files[c]]
    if empty:
        raise DataError(
            f"{where}: the class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} "
            f"hold{'' if len(empty) > 1 else 's'} no image files (any format Pillow reads, e.g. "
            ".png, .jpg): add images or remove the folder"
        )
    return files


def _decode(files: dict[str, list[Path]], classes: list[str], size: int, warn, where: str):
    """Decode every file: (uint8 [N, 3, size, size], labels [N], all grey?). An unreadable file
    is skipped and counted (one warning names the first few): a scraped folder often holds a
    few broken files, and a run should not stop for them; a class left with no image is an
    error."""
    from PIL import ImageOps
    from tqdm.auto import tqdm

    todo = [(p, label) for label, c in enumerate(classes) for p in files[c]]
    images, labels, skipped = [], [], []
    grey = True
    for path, label in tqdm(todo, desc=f"decoding {where}", unit="img", leave=False,
                            disable=len(todo) < 2000):  # fmt: skip
        try:
            with open_limited(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                grey = grey and img.mode in GREY_MODES
                images.append(image_to_tensor(img, 3, size))
            labels.append(label)
        except Exception as e:  # any decoder failure of one file: skip it, say so below
            skipped.append(f"{path} ({one_line(e, 100)})")
    if skipped:
        shown = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        warn(f"{where}: skipped {len(skipped)} of {len(todo)} unreadable image files: {shown}")
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=len(classes))
    lost = [c for c, n in zip(classes, counts.tolist(), strict=True) if n == 0]
    if lost:
        raise DataError(
            f"{where}: no readable image in the class folder(s) {', '.join(lost)}: replace the "
            "unreadable files"
        )
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), grey


def _held_out(labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """A seeded per-class choice of round(fraction * n) images (at least one left to train)."""
    g = torch.Generator().manual_seed(FOLDER_TEST_SEED)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == c).flatten()
        n = min(len(members) - 1, round(fraction * len(members)))
        test[members[torch.randperm(len(members), generator=g)[:n]]] = True
    return test


def load_folder(path, size: int, test_fraction: float = 0.2, warn=print) -> Dataset:
    """An image folder: PATH/train/<class>/* and PATH/test/<class>/*, or PATH/<class>/* with
    `test_fraction` of each class held out (seeded, fixed). Images are RGB, or grey when every
    file is a grey mode; resized to `size` (shorter side) and centre-cropped square."""
    root = Path(path)
    name = f"folder:{path}"
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"--dataset {name}: {root} {what}; give a folder of class folders")
    top = _class_dirs(root)
    split = "train" in top and "test" in top
    if split:
        classes = _class_dirs(root / "train")
        test_classes = _class_dirs(root / "test")
        if classes != test_classes:
            raise DataError(
                f"--dataset {name}: {root / 'train'} has the classes {classes} but "
                f"{root / 'test'} {test_classes}: both need the same class folders"
            )
    elif "train" in top or "test" in top:
        have, lack = ("train", "test") if "train" in top else ("test", "train")
        raise DataError(
            f"--dataset {name}: {root} has {have}/ but no {lack}/: add {root / lack}/<class>/..., "
            "or put the class folders directly in the folder (a test fraction is then held out)"
        )
    else:
        classes = top
    if len(classes) < 2:
        where = root / "train" if split else root
        raise DataError(
            f"--dataset {name}: {where} has {len(classes)} class folder"
            f"{'' if len(classes) == 1 else 's'}{' (' + classes[0] + ')' if classes else ''}; a "
            "classifier needs at least two, one folder of images per class"
        )
    if split:
        train_dir, test_dir = str(root / "train"), str(root / "test")
        train = _decode(_files_by_class(root / "train", classes, train_dir, warn), classes, size,
                        warn, train_dir)  # fmt: skip
        test = _decode(_files_by_class(root / "test", classes, test_dir, warn), classes, size,
                       warn, test_dir)  # fmt: skip
        grey = train[2] and test[2]
        (train_x, train_y), (test_x, test_y) = train[:2], test[:2]
    else:
        x, y, grey = _decode(_files_by_class(root, classes, str(root), warn), classes, size, warn,
                             str(root))  # fmt: skip
        held = _held_out(y, test_fraction)
        if not held.any():
            raise DataError(
                f"--dataset {name}: too few images to hold out a test set ({len(y)} in "
                f"{len(classes)} classes at --test-fraction {test_fraction}): add images, or "
                "give train/ and test/ folders"
            )
        train_x, train_y, test_x, test_y = x[~held], y[~held], x[held], y[held]
    if grey:  # every file was grey: one channel (image_to_tensor made R = G = B)
        train_x, test_x = train_x[:, :1].contiguous(), test_x[:, :1].contiguous()
    return Dataset(train_x, train_y, test_x, test_y, class_names=tuple(classes), name=name,
                   style="photo", flips=True)  # fmt: skip
