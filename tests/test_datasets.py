"""Data sets beyond MNIST: each reader on small files generated in its real on-disk format (IDX,
CIFAR-10's pickled batches, SVHN's .mat, an image folder of PNG and JPEG files in mixed modes and
sizes), clear errors for bad data, colour augmentation, streaming from host memory, the CIFAR-10
preset's model, `--routing auto`'s size rule, and class names through training, export, predict,
the app and the figures.

Cost: about 1.5 minutes on 2 free cores (3.1 minutes with tests/test_data.py at load average 7
on the shared 2-core machine), most of it the trainer runs (7 short runs on 20x20 inputs, the
smallest size where CapsNet's primary grid is 2x2).
"""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capsfast.config import resolve
from capsfast.data import (
    MNIST_CLASSES,
    DataError,
    Dataset,
    TrainBatches,
    augment,
    centre_crop,
    choose_placement,
    default_val_size,
    sample_crops,
    sample_flips,
    shift_images,
    split_train_val,
)
from capsfast.datasets import load_dataset, parse_name
from capsfast.train import data_line

SIZE = 20  # model input side in the training tests


# --------------------------------------------------------------------------- file writers
def patterned(n: int, classes: int, channels: int, side: int, seed: int = 0):
    """Learnable images: class k is a bright 5x5 block at a class-dependent place (colour: also a
    class-dependent colour), on noise. uint8 [n, C, side, side], labels [n]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = (torch.rand(n, channels, side, side, generator=g) * 50).to(torch.uint8)
    for i, k in enumerate(labels.tolist()):
        r, c = 7 + 3 * (k % 3), 7 + 3 * ((k // 3) % 3)
        colour = [
            255 if (k + ch) % channels == 0 or channels == 1 else 80 for ch in range(channels)
        ]
        images[i, :, r : r + 5, c : c + 5] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
    return images, labels


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_idx_set(root: Path, name: str, n_train=160, n_test=40, classes=10) -> Path:
    """torchvision's layout for `name` (fashion-mnist, kmnist, emnist-SPLIT) under root."""
    family, split = parse_name(name)
    folder = {"fashion-mnist": "FashionMNIST", "kmnist": "KMNIST", "emnist": "EMNIST"}[family]
    raw = root / folder / "raw"
    for s, n in (("train", n_train), ("test", n_test)):
        x, y = patterned(n, classes, 1, 28, seed=n)
        images = x[:, 0].numpy()
        if family == "emnist":
            images = images.transpose(0, 2, 1)  # EMNIST stores images transposed
            prefix = f"emnist-{split}-{s}"
        else:
            prefix = "train" if s == "train" else "t10k"
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, gz=s == "train")
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y.numpy(), gz=s == "train")
    return root


def write_cifar10(root: Path, per_batch=32, n_test=40) -> Path:
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    for i, name in enumerate([*(f"data_batch_{j}" for j in range(1, 6)), "test_batch"]):
        x, y = patterned(n_test if name == "test_batch" else per_batch, 10, 3, 32, seed=i)
        batch = {"data": x.reshape(len(x), -1).numpy(), "labels": y.tolist(), "batch_label": name}
        (directory / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]  # fmt: skip
    (directory / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root


def write_svhn(root: Path, n_train=160, n_test=40) -> Path:
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = patterned(n, 10, 3, 32, seed=n)
        X = x.numpy().transpose(2, 3, 1, 0)  # SVHN's [H, W, C, N]
        labels = y.numpy().reshape(-1, 1).copy()
        labels[labels == 0] = 10  # SVHN labels the digit 0 as 10
        scipy.io.savemat(str(root / f"{split}_32x32.mat"), {"X": X, "y": labels})
    return root


def write_folder(root: Path, classes: dict[str, int], side=24, modes=("RGB",), sizes=None,
                 seed=0, jpeg_every=3) -> Path:  # fmt: skip
    """root/<class>/<i>.png|jpg: class k a saturated colour, in the given PIL modes and sizes."""
    g = np.random.default_rng(seed)
    colours = [(230, 30, 30), (30, 200, 30), (40, 40, 230), (220, 220, 30)]
    for k, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            w, h = sizes[i % len(sizes)] if sizes else (side, side)
            a = np.clip(g.normal(colours[k], 25, (h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(a)
            mode = modes[i % len(modes)]
            img = img.convert(mode) if mode != "P" else img.quantize(16)
            jpeg = i % jpeg_every == jpeg_every - 1 and mode in ("RGB", "L")
            img.save(root / name / f"{i}.{'jpg' if jpeg else 'png'}")
    return root


def small_run(tmp_path, **kw):
    base = dict(batch_size=16, max_steps=12, lr=4e-3, val_size=16, report_to="none",
                checkpoint_every=0, log_every=4, eval_batch_size=64, cpu_threads=2,
                output_dir=str(tmp_path / "run"), mixed_precision="no", compile=False)  # fmt: skip
    return resolve({**base, **kw})


# --------------------------------------------------------------------------- readers
def test_class_names_are_torchvisions():
    import torchvision.datasets as tv

    assert list(MNIST_CLASSES) == tv.MNIST.classes


def test_idx_family_in_torchvisions_layout(tmp_path):
    import torchvision.datasets as tv

    fashion = load_dataset("fashion-mnist", write_idx_set(tmp_path / "f", "fashion-mnist"))
    assert fashion.train_images.shape == (160, 1, 28, 28) and fashion.test_labels.shape == (40,)
    assert list(fashion.class_names) == tv.FashionMNIST.classes and fashion.style == "fit"
    kmnist = load_dataset("kmnist", write_idx_set(tmp_path / "k", "kmnist"))
    assert list(kmnist.class_names) == tv.KMNIST.classes and not kmnist.flips
    # EMNIST is stored transposed: the reader turns it upright (same pixels as written).
    letters = load_dataset("emnist-letters", write_idx_set(tmp_path / "e", "emnist-letters"))
    want, _ = patterned(160, 10, 1, 28, seed=160)
    assert torch.equal(letters.train_images, want)
    assert letters.class_names[:3] == ("N/A", "a", "b") and letters.num_classes == 27


def test_cifar10_reads_pickled_batches(tmp_path):
    data = load_dataset("cifar10", write_cifar10(tmp_path))
    assert data.train_images.shape == (160, 3, 32, 32) and data.test_images.shape == (40, 3, 32, 32)
    x, y = patterned(32, 10, 3, 32, seed=0)  # data_batch_1, pixel for pixel
    assert torch.equal(data.train_images[:32], x) and torch.equal(data.train_labels[:32], y)
    assert data.class_names[3] == "cat" and data.flips and data.style == "photo"


def test_svhn_reads_mat_files_and_maps_10_to_0(tmp_path):
    data = load_dataset("svhn", write_svhn(tmp_path))
    x, y = patterned(160, 10, 3, 32, seed=160)
    assert torch.equal(data.train_images, x) and torch.equal(data.train_labels, y)
    assert data.train_labels.min() == 0 and not data.flips  # flipped digits read differently


def test_folder_mixed_modes_and_sizes(tmp_path):
    """L, RGB, RGBA and P files, PNG and JPEG, of three sizes: one RGB tensor at --image-size."""
    root = write_folder(tmp_path / "pics", {"cat": 10, "dog": 10},
                        modes=("RGB", "L", "RGBA", "P"), sizes=[(24, 24), (40, 30), (17, 50)])  # fmt: skip
    data = load_dataset(f"folder:{root}", image_size=SIZE, test_fraction=0.2)
    assert data.class_names == ("cat", "dog") and data.channels == 3 and data.image_size == SIZE
    assert len(data.train_labels) == 16 and len(data.test_labels) == 4  # 2 of each class held out
    assert torch.bincount(data.test_labels).tolist() == [2, 2]
    again = load_dataset(f"folder:{root}", image_size=SIZE, test_fraction=0.2)
    assert torch.equal(again.test_images, data.test_images)  # a fixed, seeded hold-out
    # Colour survives: the cat folder is red, the dog folder green (the grey files excepted).
    red = data.train_images[data.train_labels == 0].float().mean((0, 2, 3))
    assert red[0] > red[1] + 20


def test_folder_train_test_layout_and_grey(tmp_path):
    write_folder(tmp_path / "d" / "train", {"a": 4, "b": 4}, modes=("L",))
    write_folder(tmp_path / "d" / "test", {"a": 2, "b": 2}, modes=("L",))
    data = load_dataset(f"folder:{tmp_path / 'd'}", image_size=SIZE)
    assert data.channels == 1 and data.train_images.shape == (8, 1, SIZE, SIZE)
    assert data.test_labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "layout, match",
    [
        ({"only": 3}, "has 1 class folder.*at least two"),
        ({"a": 3, "empty": 0}, "class folder empty holds no image files"),
        ({}, "has 0 class folders"),
    ],
)
def test_folder_errors(tmp_path, layout, match):
    root = write_folder(tmp_path / "x", layout)
    root.mkdir(exist_ok=True)
    with pytest.raises(DataError, match=match):
        load_dataset(f"folder:{root}", image_size=SIZE)


def test_folder_unreadable_images_are_skipped_and_counted(tmp_path):
    """Decision: skip and count (a scraped folder often holds a few broken files; stopping a run
    for them helps nobody); a class left with no readable image is an error."""
    root = write_folder(tmp_path / "x", {"a": 5, "b": 5})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "b" / "cut.jpg").write_bytes((root / "b" / "2.jpg").read_bytes()[:40])
    (root / "b" / "notes.txt").write_text("not an image: ignored, not counted")
    warnings = []
    data = load_dataset(f"folder:{root}", image_size=SIZE, warn=warnings.append)
    assert len(data.train_labels) + len(data.test_labels) == 10
    assert len(warnings) == 1 and "skipped 2 of 12 unreadable" in warnings[0]
    assert "broken.png" in warnings[0] and "cut.jpg" in warnings[0]
    for f in (root / "a").iterdir():
        f.write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable image in the class folder.*a"):
        load_dataset(f"folder:{root}", image_size=SIZE, warn=warnings.append)


def test_folder_links_are_never_followed_into_loops_or_out_of_the_tree(tmp_path):
    """The issue's folder: 10 images, `red/loop -> ..` and `blue/self -> .` (followed, they
    made 4,510 images, most of one class labelled as the other). Each file is read once, under
    its real path; a loop or a link out of the class folders is skipped and counted in a
    warning. In a train/test layout, a test image linked to a training image is no test image."""
    root = write_folder(tmp_path / "x", {"red": 5, "green": 5})
    (root / "red" / "loop").symlink_to("..")
    (root / "green" / "self").symlink_to(".")
    outside = write_folder(tmp_path / "elsewhere", {"z": 1})
    (root / "red" / "far.png").symlink_to(outside / "z" / "0.png")  # out of the tree
    (root / "green" / "twice.png").symlink_to(root / "green" / "0.png")  # a second name
    warnings = []
    data = load_dataset(f"folder:{root}", image_size=SIZE, warn=warnings.append)
    labels = torch.cat([data.train_labels, data.test_labels])
    assert data.class_names == ("green", "red") and torch.bincount(labels).tolist() == [5, 5]
    # Labelled as the files' real folders say: the green images green, the red ones red.
    rgb = torch.cat([data.train_images, data.test_images]).float().mean((2, 3))
    assert (rgb[labels == 0, 1] > rgb[labels == 0, 0]).all()
    assert (rgb[labels == 1, 0] > rgb[labels == 1, 1]).all()
    assert len(warnings) == 1 and "skipped 4 symbolic links" in warnings[0], warnings
    assert "loop -> .. (a loop)" in warnings[0] and "self -> . (a loop)" in warnings[0]
    assert "far.png" in warnings[0] and "out of the class folders" in warnings[0]

    write_folder(tmp_path / "d" / "train", {"a": 3, "b": 3})
    write_folder(tmp_path / "d" / "test", {"a": 1, "b": 1})
    leak = tmp_path / "d" / "test" / "a" / "leak.png"
    leak.symlink_to(tmp_path / "d" / "train" / "a" / "0.png")
    warnings = []
    data = load_dataset(f"folder:{tmp_path / 'd'}", image_size=SIZE, warn=warnings.append)
    assert len(data.test_labels) == 2 and len(data.train_labels) == 6
    assert len(warnings) == 1 and "leak.png" in warnings[0], warnings


def test_folder_with_train_but_no_test(tmp_path):
    write_folder(tmp_path / "d" / "train", {"a": 2, "b": 2})
    with pytest.raises(DataError, match="has train/ but no test/"):
        load_dataset(f"folder:{tmp_path / 'd'}", image_size=SIZE)


def test_missing_and_corrupt_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    for name, missing in (("cifar10", "data_batch_1"), ("svhn", "train_32x32.mat"),
                          ("fashion-mnist", "train-images-idx3-ubyte"),
                          ("emnist-balanced", "emnist-balanced-train-images")):  # fmt: skip
        with pytest.raises(DataError, match=f"{missing}.*not found.*--data-dir.*--download"):
            load_dataset(name, tmp_path / "empty")
    root = write_cifar10(tmp_path / "c")
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR-10 batch.*corrupt"):
        load_dataset("cifar10", root)
    root = write_svhn(tmp_path / "s")
    (root / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(DataError, match="test_32x32.mat: not an SVHN .mat file"):
        load_dataset("svhn", root)
    with pytest.raises(ValueError, match="unknown --dataset 'emnist-foo'.*emnist-letters"):
        parse_name("emnist-foo")


def test_a_failed_download_is_one_line(tmp_path):
    """torchvision's downloaders fail with one line per mirror tried (as KMNIST's did here,
    offline); the DataError keeps it to one line."""
    from capsfast.datasets import _download

    def offline():
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried http://codh.rois.ac.jp/kmnist/"
            ", got:\n<urlopen error [Errno -2] Name or service not known>\n"
        )

    with pytest.raises(DataError) as e:
        _download("kmnist", tmp_path, offline)
    message = str(e.value)
    assert "\n" not in message and "RuntimeError: Error downloading" in message
    assert message.endswith(
        "put the files there yourself (torchvision's layout) and pass --data-dir"
    )


# --------------------------------------------------------------------------- augmentation
def test_crops_flips_are_pure_functions_of_seed_epoch_index():
    idx = torch.arange(4000)
    top, left = sample_crops(idx, seed=0, epoch=0, slack=8)
    assert top.min() == 0 and top.max() == 8 and left.min() == 0 and left.max() == 8
    flips = sample_flips(idx, 0, 0)
    assert 0.45 < flips.float().mean() < 0.55
    assert torch.equal(sample_flips(idx.flip(0), 0, 0), flips.flip(0))
    assert not torch.equal(sample_flips(idx, 0, 1), flips)
    images = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    out = augment(images, idx[:6], 0, 0, crop=24, flip=True)
    t, l = sample_crops(idx[:6], 0, 0, 8)
    for i in range(6):
        want = images[i, :, t[i] : t[i] + 24, l[i] : l[i] + 24]
        assert torch.equal(out[i], want.flip(-1) if flips[i] else want)
    assert centre_crop(images, 24).shape == (6, 3, 24, 24)
    assert torch.equal(centre_crop(images, 24), images[:, :, 4:28, 4:28])
    # A shift of a colour image moves every channel alike.
    dy, dx = torch.tensor([1, -2, 0, 2, -1, 0]), torch.tensor([0, 2, -1, 1, 1, 0])
    colour = shift_images(images, dy, dx, pad=2)
    for ch in range(3):
        assert torch.equal(colour[:, ch], shift_images(images[:, ch], dy, dx, pad=2))


def test_streamed_batches_equal_resident_ones_on_every_rank():
    """Host-memory chunks (also across the epoch boundary and for 2 ranks) give the batches the
    device-resident path gives: the same permutation, crops and flips."""
    x = torch.randint(0, 255, (150, 3, 12, 12), dtype=torch.uint8)
    y = torch.arange(150) % 7
    kw = dict(max_shift=1, crop=10, flip=True)
    for world in (1, 2):
        for rank in range(world):
            resident = TrainBatches(x, y, 16, 5, rank=rank, world_size=world, **kw)
            streamed = TrainBatches(x, y, 16, 5, rank=rank, world_size=world, stream=True, **kw)
            streamed.chunks.chunk_steps = 4  # several chunks per epoch of 9 steps
            for epoch, k in [(0, 0), (0, 3), (0, 4), (0, 8), (1, 0), (1, 5), (2, 8)]:
                a, b = resident.batch(epoch, k), streamed.batch(epoch, k)
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (world, epoch, k)
                assert a[0].shape == (16 // world, 3, 10, 10)


def test_placement_rule():
    gib = 2**30
    assert choose_placement("auto", 10 * gib, "cpu", None) == "device"
    assert choose_placement("auto", 1 * gib, "cuda", 40 * gib) == "device"
    assert choose_placement("auto", 11 * gib, "cuda", 40 * gib) == "stream"  # > a quarter
    assert choose_placement("stream", 1, "cpu", None) == "stream"
    assert choose_placement("device", 99 * gib, "cuda", 1 * gib) == "device"


def test_val_size_is_capped_at_a_tenth_and_the_banner_says_so():
    """A small folder trains under the default --val-size 5000: the held-out set is at most a
    tenth of the training images, and the data line says it was capped (never silently)."""
    n = 600
    data = Dataset(torch.zeros(n, 1, SIZE, SIZE, dtype=torch.uint8), torch.arange(n) % 10,
                   torch.zeros(10, 1, SIZE, SIZE, dtype=torch.uint8), torch.arange(10),
                   name="folder:x", class_names=MNIST_CLASSES)  # fmt: skip
    cfg = resolve({"val_size": 5000})
    val_size = default_val_size(cfg.val_size, n)
    assert val_size == 60
    (train_x, _), (val_x, _) = split_train_val(data, val_size)
    assert (len(train_x), len(val_x)) == (540, 60)
    line = data_line(data, cfg, 540, 60, 10, False, "device")
    assert "540 train, 60 validation (--val-size capped at a tenth), 10 test" in line
    assert "capped" not in data_line(data, resolve({"val_size": 60}), 540, 60, 10, False, "device")
    with pytest.raises(DataError, match="--val-size 600 leaves no training images"):
        split_train_val(data, n)


# --------------------------------------------------------------------------- the model
def test_cifar10_preset_shapes_and_parameter_count():
    from capsfast.model import CapsNet, compute_loss
    from capsfast.train import model_config_for

    cfg = resolve({"preset": "cifar10"})
    x, y = patterned(4, 10, 3, 32)
    data = Dataset(x, y, x, y, class_names=tuple("abcdefghij"), name="cifar10", style="photo")
    mc = model_config_for(data, cfg)
    assert (mc.in_channels, mc.image_size, mc.primary_types, mc.none_class) == (3, 24, 64, True)
    assert (mc.primary_grid, mc.num_primary, mc.routed_capsules) == (4, 1024, 11)
    model = CapsNet(mc)
    # Counted by hand: conv1 3*81*256 + 256; PrimaryCaps 256*512*81 + 512; W 1024*11*16*8;
    # bias 11*16; decoder (160*512 + 512) + (512*1024 + 1024) + (1024*1728 + 1728).
    by_hand = 62_464 + 10_617_344 + 1_441_792 + 176 + 82_432 + 525_312 + 1_771_200
    assert sum(p.numel() for p in model.parameters()) == by_hand == 14_500_720
    assert model.digit.W.shape == (1024, 11, 16, 8) and model.digit.bias.shape == (11, 16)
    images = centre_crop(x, 24).float() / 255
    out, loss, margin, _ = compute_loss(model, images, y)
    assert out.lengths.shape == (4, 10) and out.poses.shape == (4, 10, 16)  # the 10 real classes
    assert out.reconstructions.shape == (4, 3, 24, 24) and torch.isfinite(loss)
    # The 11th capsule takes part in routing: without it the ten capsules come out different.
    v11 = model.digit(model.primary(torch.relu(model.conv1(images))))
    assert torch.allclose(v11[:, :10], out.poses)
    plain = CapsNet(mc.__class__(**{**mc.__dict__, "none_class": False}))
    with torch.no_grad():
        plain.load_state_dict({k: (v[:, :10] if k == "digit.W" else v[:10] if k == "digit.bias"
                                   else v) for k, v in model.state_dict().items()})  # fmt: skip
    assert not torch.allclose(plain(images).poses, out.poses)


def test_image_size_is_refused_where_it_would_be_ignored():
    """--image-size resizes folder: images; for a data set of fixed size it was silently ignored."""
    with pytest.raises(ValueError, match="--image-size resizes folder: data sets only.*--crop"):
        resolve({"dataset": "cifar10", "image_size": 48}).validate()
    assert resolve({"dataset": "folder:pics", "image_size": 48}).validate().image_size == 48


def test_smallest_input_is_17_pixels():
    """Two 9x9 convolutions, the second with stride 2: 17x17 leaves a 1x1 primary grid, 16x16
    nothing; the error says the real minimum (it said 25 before)."""
    from capsfast.model import CapsNet, ModelConfig

    with pytest.raises(ValueError, match="16x16 input is too small.*at least 17x17 pixels"):
        ModelConfig(image_size=16)
    cfg = ModelConfig(image_size=17, in_channels=3, num_classes=4)
    assert cfg.primary_grid == 1 and cfg.num_primary == 32
    out = CapsNet(cfg)(torch.rand(2, 3, 17, 17))
    assert out.lengths.shape == (2, 4) and out.reconstructions.shape == (2, 3, 17, 17)


def test_fused_routing_with_too_many_classes_is_a_one_line_error(tmp_path, capsys):
    """EMNIST balanced (47 classes) with --routing fused: the kernel takes J <= 32; a one-line
    error before training (it was the kernel's ValueError, with a traceback, at the first step)."""
    from capsfast.cli import run

    root = write_idx_set(tmp_path / "e", "emnist-balanced", n_train=40, n_test=10, classes=47)
    args = ["--dataset", "emnist-balanced", "--data-dir", str(root), "--routing", "fused",
            "--max-steps", "1", "--batch-size", "4", "--report-to", "none",
            "--output-dir", str(tmp_path / "run")]  # fmt: skip
    assert run("train", args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("capsfast: error: --routing fused takes at most 32")
    assert "routes to 47" in err[0]
    # predict with such a model: the same line, before any image is read
    from capsfast.export import save_model
    from capsfast.model import CapsNet, ModelConfig

    save_model(CapsNet(ModelConfig(image_size=SIZE, num_classes=47)), tmp_path / "m")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "x.png")
    predict = ["--model", str(tmp_path / "m"), "--routing", "fused", "--device", "cpu"]
    assert run("predict", [*predict, str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("predict: error: --routing fused takes at most 32")


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize(
    "name, writer, extra",
    [
        ("fashion-mnist", lambda p: write_idx_set(p, "fashion-mnist"), {"crop": SIZE}),
        ("kmnist", lambda p: write_idx_set(p, "kmnist"), {"crop": SIZE}),
        ("emnist-digits", lambda p: write_idx_set(p, "emnist-digits"), {"crop": SIZE}),
        ("cifar10", write_cifar10, {"crop": SIZE}),
        ("svhn", write_svhn, {"crop": SIZE, "data_placement": "stream"}),
    ],
)
def test_a_few_steps_reduce_the_loss(tmp_path, name, writer, extra):
    from capsfast.train import train

    root = writer(tmp_path / "data")
    summary = train(small_run(tmp_path, dataset=name, data_dir=str(root), **extra))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["train_loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < 0.8 * losses[0], losses
    assert summary["dataset"] == name and len(summary["class_names"]) == 10
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["meta"]["dataset"] == name and config["model"]["image_size"] == SIZE
    assert config["model"]["class_names"] == summary["class_names"]
    # A validation split held out of train (16 of the 160 training images), the test set apart.
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert (resolved["val_size"], resolved["train_size"]) == (16, 144)
    epochs = [r for r in records if r["kind"] == "epoch"]  # 9 steps an epoch: one end of epoch
    assert epochs and all(0 <= r["val_accuracy"] <= 1 for r in epochs)


def test_separable_colour_folder_end_to_end(tmp_path, capsys):
    """Three clearly separable colour classes in a folder: high test accuracy in 36 steps, and
    the class names through export, predict (--json and text), the app and the figures."""
    from capsfast.app import AppModel
    from capsfast.export import load_model
    from capsfast.infer import main as predict_main
    from capsfast.train import train

    root = write_folder(tmp_path / "colours", {"red": 40, "green": 40, "blue": 40}, side=28,
                        modes=("RGB", "RGBA", "P"), sizes=[(28, 28), (36, 30)])  # fmt: skip
    cfg = small_run(tmp_path, dataset=f"folder:{root}", image_size=SIZE, max_steps=36,
                    test_fraction=0.25)  # fmt: skip
    summary = train(cfg)
    print(f"\n[colour folder] test accuracy {summary['test_accuracy']:.1%} after 36 steps")
    assert summary["test_accuracy"] >= 0.9 and summary["class_names"] == ["blue", "green", "red"]
    model_dir = tmp_path / "run" / "model"
    model = load_model(model_dir)
    assert model.config.labels == ("blue", "green", "red") and model.config.input_style == "photo"

    # predict: a big red photo, then a green one as text.
    Image.fromarray(np.full((90, 60, 3), (230, 30, 30), np.uint8)).save(tmp_path / "r.png")
    Image.fromarray(np.full((50, 50, 3), (30, 200, 30), np.uint8)).save(tmp_path / "g.jpg")
    capsys.readouterr()
    assert predict_main(["--model", str(model_dir), "--json", str(tmp_path / "r.png")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["class_name"] == "red" and row["label"] == 2 and len(row["lengths"]) == 3
    assert predict_main(["--model", str(model_dir), str(tmp_path / "g.jpg")]) == 0
    assert ": 1 (green)  (lengths 0-2:" in capsys.readouterr().out

    # the app: bars named by class, the model's input in colour
    logic = AppModel(model)
    r = logic.analyse(np.full((64, 64, 4), (40, 40, 230, 255), np.uint8))
    assert r["class_name"] == "blue" and logic.class_names == ("blue", "green", "red")
    assert r["input"].shape == (3, SIZE, SIZE) and r["reconstruction"].shape == (3, SIZE, SIZE)

    # the figures the run drew, and the confusion matrix's labels
    assert (tmp_path / "run" / "figures" / "confusion_matrix.png").is_file()
    from capsfast import figures

    drawn = {}
    monkey = pytest.MonkeyPatch()
    monkey.setattr(figures, "_save", lambda fig, path: drawn.setdefault("fig", fig))
    figures._plot_confusion(torch.eye(3, dtype=torch.long), "unused", model.config.labels)
    monkey.undo()
    ticks = [t.get_text() for t in drawn["fig"].axes[0].get_xticklabels()]
    assert ticks == ["blue", "green", "red"]

    # visualize holds out the run's test images (--test-fraction 0.25: 30 of 120, not 24)
    capsys.readouterr()
    assert figures.main([str(model_dir), "--out", str(tmp_path / "vis"), "--device", "cpu"]) == 0
    assert f"30 folder:{root} test images" in capsys.readouterr().out
    assert (tmp_path / "vis" / "confusion_matrix.png").is_file()


def test_predict_prepares_each_input_style_from_the_exported_config():
    """fit (Fashion-MNIST): a dark object on a light page, inverted and scaled to fill the frame;
    mnist at another size: the 20x20-box digit, resized to the model's side; photo: RGB, shorter
    side to input_resize, centre crop (a 2:1 picture loses its sides, keeps its colour)."""
    from capsfast.infer import prepare_input
    from capsfast.model import ModelConfig

    page = np.full((60, 90), 240, np.uint8)
    page[20:40, 30:60] = 20  # a 30 x 20 dark object, off-centre on a light page
    x = prepare_input(ModelConfig(input_style="fit"), Image.fromarray(page))
    assert x.shape == (1, 28, 28) and x[0, 14, 14] > 0.8  # light on dark, centred
    filled = torch.nonzero(x[0] > 0.5)
    assert filled[:, 1].min() == 0 and filled[:, 1].max() == 27  # the long side fills the frame
    assert x[0, 0, 14] < 0.1 and x[0, 27, 14] < 0.1  # the short side does not
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255
    small = prepare_input(ModelConfig(image_size=SIZE), Image.fromarray(digit))
    assert small.shape == (1, SIZE, SIZE) and small.max() > 0.5 and small[0, :, 0].max() == 0
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :20] = (0, 0, 255)  # blue sides, cropped away; a red centre
    wide[:, 20:60] = (255, 0, 0)
    wide[:, 60:] = (0, 0, 255)
    cfg = ModelConfig(in_channels=3, image_size=SIZE, input_style="photo", input_resize=24)
    photo = prepare_input(cfg, Image.fromarray(wide))
    assert photo.shape == (3, SIZE, SIZE)
    assert photo[0].min() > 0.9 and photo[2].max() < 0.1  # all red: the blue sides are gone


def test_old_export_without_class_names_loads_as_mnist_digits(tmp_path):
    from capsfast.export import load_model, save_model
    from capsfast.infer import predict_files
    from capsfast.model import CapsNet

    save_model(CapsNet(), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    for key in ("class_names", "none_class", "input_style", "input_resize"):
        del config["model"][key]  # what an export written before data sets holds
    path.write_text(json.dumps(config))
    model = load_model(tmp_path / "m")
    assert model.config.labels == MNIST_CLASSES
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    Image.fromarray(digit).save(tmp_path / "one.png")
    (r,) = predict_files(model, [tmp_path / "one.png"])
    assert r.class_name == MNIST_CLASSES[r.label]
