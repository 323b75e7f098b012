"""MNIST reading, corrupt and missing files, splits, on-device batching and shift augmentation."""

import gzip
import shutil

import pytest
import torch

from capsfast.data import (
    DEFAULT_DATA_DIR,
    FILES,
    DataError,
    TrainBatches,
    load_mnist,
    sample_shifts,
    shift_images,
    split_train_val,
)


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_shipped_copy_is_real_mnist(mnist):
    # The data layer's shape: uint8 [N, C, H, W] (MNIST: one channel).
    assert (
        mnist.train_images.shape == (60000, 1, 28, 28) and mnist.train_images.dtype == torch.uint8
    )
    assert mnist.test_images.shape == (10000, 1, 28, 28)
    assert mnist.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(mnist.train_labels).tolist()[:2] == [5923, 6742]
    assert mnist.train_images.float().mean().item() == pytest.approx(33.32, abs=0.05)


def _copy(tmp_path, gz=True, layout="flat"):
    target = tmp_path / ("MNIST/raw" if layout == "torchvision" else "")
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        src = DEFAULT_DATA_DIR / (name + ".gz")
        if gz:
            shutil.copy(src, target / (name + ".gz"))
        else:
            (target / name).write_bytes(gzip.decompress(src.read_bytes()))
    return target


@pytest.mark.parametrize(
    "gz,layout", [(False, "flat"), (True, "torchvision"), (False, "torchvision")]
)
def test_reads_any_layout(tmp_path, mnist, gz, layout):
    _copy(tmp_path, gz=gz, layout=layout)
    other = load_mnist(tmp_path)
    assert torch.equal(other.test_images, mnist.test_images)
    assert torch.equal(other.train_labels, mnist.train_labels)


def test_missing_directory_says_how_to_provide(tmp_path):
    with pytest.raises(DataError, match="does not exist.*--data-dir.*--download"):
        load_mnist(tmp_path / "nowhere")


def test_missing_file_is_named(tmp_path):
    _copy(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*not found"):
        load_mnist(tmp_path)


def test_truncated_file_is_named(tmp_path):
    _copy(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        load_mnist(tmp_path)


def test_truncated_gzip_is_named(tmp_path):
    _copy(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*truncated or corrupt"):
        load_mnist(tmp_path)


def test_bad_header_is_named(tmp_path):
    _copy(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + path.read_bytes()[4:])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*bad header"):
        load_mnist(tmp_path)


def test_val_split_is_disjoint_and_seeded(mnist):
    (tx, ty), (vx, vy) = split_train_val(mnist, 5000, seed=0)
    assert tx.shape[0] == 55000 and vx.shape[0] == 5000
    (tx2, _), (vx2, _) = split_train_val(mnist, 5000, seed=0)
    assert torch.equal(vx, vx2)
    (_, _), (none_x, _) = split_train_val(mnist, 0)
    assert none_x.shape[0] == 0
    with pytest.raises(ValueError, match="--val-size"):
        split_train_val(mnist, 60000)


def test_shifts_are_in_range_and_depend_only_on_seed_epoch_index():
    idx = torch.arange(5000)
    dy, dx = sample_shifts(idx, seed=0, epoch=0, max_shift=2)
    assert dy.min() == -2 and dy.max() == 2 and dx.min() == -2 and dx.max() == 2
    counts = torch.bincount(dy + 2, minlength=5).float() / 5000
    assert (counts > 0.15).all()  # roughly uniform over the 5 values
    dy2, dx2 = sample_shifts(idx.flip(0), seed=0, epoch=0, max_shift=2)
    assert torch.equal(dy2, dy.flip(0)) and torch.equal(dx2, dx.flip(0))
    dy3, _ = sample_shifts(idx, seed=0, epoch=1, max_shift=2)
    assert not torch.equal(dy3, dy)
    assert not torch.equal(sample_shifts(idx, 1, 0, 2)[0], dy)


def test_shift_moves_pixels_and_pads_with_zeros():
    img = torch.zeros(2, 28, 28, dtype=torch.uint8)
    img[:, 10, 10] = 255
    img[:, 0, 27] = 7  # on the edge: shifted out
    out = shift_images(img, torch.tensor([1, -2]), torch.tensor([-2, 2]), pad=2)
    assert out[0, 11, 8] == 255 and out[1, 8, 12] == 255
    assert out[0].sum() == 255 + 7  # (0,27)->(1,25) stays inside
    assert out[1].sum() == 255  # (0,27)->(-2,29) falls off


def test_rank_shards_make_up_the_single_process_batch(mnist):
    x, y = mnist.train_images[:1000], mnist.train_labels[:1000]
    single = TrainBatches(x, y, 64, seed=3, max_shift=2)
    ranks = [TrainBatches(x, y, 64, seed=3, max_shift=2, rank=r, world_size=2) for r in range(2)]
    for epoch, k in [(0, 0), (0, 5), (2, 7)]:
        bx, by = single.batch(epoch, k)
        parts = [b.batch(epoch, k) for b in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), bx)
        assert torch.equal(torch.cat([p[1] for p in parts]), by)
        assert bx.shape == (64, 1, 28, 28) and bx.dtype == torch.float32 and bx.max() <= 1
    assert single.steps_per_epoch == 1000 // 64
    with pytest.raises(ValueError, match="divisible"):
        TrainBatches(x, y, 63, seed=0, max_shift=2, world_size=2)


def test_epochs_are_permutations(mnist):
    x = torch.arange(256, dtype=torch.uint8).view(256, 1, 1).expand(256, 28, 28).contiguous()
    y = torch.arange(256)
    batches = TrainBatches(x, y, 32, seed=0, max_shift=0)
    seen = torch.cat([batches.batch(0, k)[1] for k in range(batches.steps_per_epoch)])
    assert sorted(seen.tolist()) == list(range(256))
    other = torch.cat([batches.batch(1, k)[1] for k in range(batches.steps_per_epoch)])
    assert not torch.equal(seen, other)


def test_data_dir_that_is_a_file_is_a_clear_error(tmp_path):
    path = tmp_path / "mnist.zip"
    path.write_bytes(b"PK")
    with pytest.raises(DataError, match="is a file, not a directory.*--data-dir"):
        load_mnist(path)


@pytest.mark.parametrize("dims", [(0, 28, 28), (5, 0, 28)])
def test_an_idx_file_with_no_items_is_one_line(tmp_path, dims):
    import struct

    from capsfast.data import read_idx

    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">4I", 0x0803, *dims))
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte: the header says .* holds no data"
    ):
        read_idx(path, "images")
