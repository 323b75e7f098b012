"""Expanded MNIST and affNIST (capsfast/affnist.py, paper section 5.2): placement on the 40x40
canvas, the affNIST-like transformations, the reader for affNIST's .mat files, the 40x40 models."""

import math

import numpy as np
import pytest
import torch

from capsfast import CapsNet, affnist, canvas
from capsfast.baseline import BaselineCNN
from capsfast.data import DataError, load_mnist


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_expanded_mnist_places_each_digit_anywhere_on_the_canvas(mnist):
    index = torch.arange(0, 60_000, 3)
    x = affnist.expanded(mnist.train_images, index, seed=0, epoch=4)
    assert x.shape == (len(index), 1, 40, 40) and x.dtype == torch.uint8
    # the digit itself is untouched: all its ink is on the canvas
    assert torch.equal(x.flatten(1).sum(1, dtype=torch.int64),
                       mnist.train_images[index].flatten(1).sum(1, dtype=torch.int64))  # fmt: skip
    # every one of the 13 x 13 positions of the 28x28 frame is used
    h = canvas.draw(index, 0, 4, 0)
    dy, dx = canvas.integers(h, -6, 6), canvas.integers(h >> 32, -6, 6)
    assert len(torch.unique(dy * 13 + dx)) == 169
    i = 5
    top, left = 6 + dy[i].item(), 6 + dx[i].item()
    assert torch.equal(x[i, 0, top : top + 28, left : left + 28], mnist.train_images[index[i], 0])
    # a pure function of (seed, epoch, index)
    again = affnist.expanded(mnist.train_images, index[100:200], seed=0, epoch=4)
    assert torch.equal(again, x[100:200])
    assert not torch.equal(affnist.expanded(mnist.train_images, index[:100], 0, 5), x[:100])


def test_the_expanded_test_set_is_fixed(mnist):
    a = affnist.expanded_test_set(mnist.test_images, size=500)
    b = affnist.expanded_test_set(mnist.test_images)
    assert b.shape == (10_000, 1, 40, 40) and torch.equal(a, b[:500])


def test_warp_conventions():
    """The identity leaves an image unchanged; a 90-degree map is torch.rot90 (so angles, shear
    and scale act about the centre, y pointing down); scaling by 1.2 grows the ink box 1.2x."""
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(3, 40, 40, dtype=torch.uint8)
    img[:, 10:25, 14:20] = torch.randint(1, 256, (3, 15, 6), generator=g, dtype=torch.uint8)
    identity = torch.eye(2, dtype=torch.float64).expand(3, 2, 2)
    assert torch.equal(affnist.warp(img, identity), img)
    quarter = affnist.linear_map({"rotation_deg": torch.full((3,), 90.0, dtype=torch.float64),
                                  "shear": torch.zeros(3, dtype=torch.float64),
                                  "scale_y": torch.ones(3, dtype=torch.float64),
                                  "scale_x": torch.ones(3, dtype=torch.float64)})  # fmt: skip
    rotated = affnist.warp(img, quarter)
    assert any(torch.equal(rotated, torch.rot90(img, k, dims=(1, 2))) for k in (1, 3))
    grow = torch.diag(torch.tensor([1.2, 1.2], dtype=torch.float64)).expand(3, 2, 2)

    def spread(x):  # the ink-weighted standard deviation of the row coordinate
        w = x.double().sum(2)
        rows = torch.arange(40, dtype=torch.float64)
        mean = (w * rows).sum(1) / w.sum(1)
        return ((w * (rows - mean[:, None]) ** 2).sum(1) / w.sum(1)).sqrt()

    assert ((spread(affnist.warp(img, grow)) / spread(img)) - 1.2).abs().max() < 0.03


def test_affnist_like_uses_affnists_ranges_and_keeps_the_digit_inside(mnist):
    x, y = affnist.affnist_like(mnist.test_images, mnist.test_labels, size=3_000)
    assert x.shape == (3_000, 1, 40, 40) and x.dtype == torch.uint8
    assert torch.equal(y, mnist.test_labels[:3_000])
    p = affnist.affine_parameters(torch.arange(3_000))
    for key, (lo, hi) in [("rotation_deg", (-20, 20)), ("shear", (-0.2, 0.2)),
                          ("scale_y", (0.8, 1.2)), ("scale_x", (0.8, 1.2))]:  # fmt: skip
        assert lo <= p[key].min() and p[key].max() < hi, key
        assert p[key].min() < lo + 0.02 * (hi - lo) and p[key].max() > hi - 0.02 * (hi - lo)
        assert abs(p[key].mean().item() - (lo + hi) / 2) < 0.03 * (hi - lo)  # uniform
    # the ink survives the transformation (bilinear resampling keeps its mass within the
    # change of area) and none of it is cut by the translation
    area = (p["scale_x"] * p["scale_y"]).float()
    ratio = x.flatten(1).sum(1).float() / mnist.test_images[:3_000].flatten(1).sum(1).float()
    assert ((ratio / area - 1).abs() < 0.25).float().mean() > 0.98
    boxes = canvas.ink_boxes(x[:, 0])
    assert boxes[:, 0].min() >= 0 and boxes[:, 2].max() <= 40
    # translations spread the digits over the frame, unlike the centred originals
    centre_y = (boxes[:, 0] + boxes[:, 2]).float() / 2
    assert centre_y.std() > 4
    # fixed: the same images on every call
    again, _ = affnist.affnist_like(mnist.test_images, mnist.test_labels, size=100)
    assert torch.equal(again, x[:100])


def write_affnist_mat(path, images, labels):
    """A small file in affNIST's format: a struct affNISTdata, one 40x40 image per column of
    `image` (1600 x N, uint8), labels in label_int, plus affNIST's other fields."""
    from scipy.io import savemat

    n = len(labels)
    savemat(str(path), {"affNISTdata": {
        "image": images.reshape(n, 1600).numpy().T.copy(),
        "label_int": labels.numpy().astype(np.uint8).reshape(1, n),
        "label_one_of_n": np.eye(10, dtype=np.uint8)[labels.numpy()].T.copy(),
        "human_readable_transform": np.zeros((5, n)),
    }})  # fmt: skip


def test_reads_affnists_mat_files(mnist, tmp_path):
    x, y = affnist.affnist_like(mnist.test_images, mnist.test_labels, size=30)
    write_affnist_mat(tmp_path / "test.mat", x, y)
    assert affnist.find_affnist(tmp_path) == [tmp_path / "test.mat"]
    images, labels = affnist.read_affnist(affnist.find_affnist(tmp_path))
    assert torch.equal(images, x) and torch.equal(labels, y)
    # the batch layout (test_batches/1.mat .. 32.mat) is read in numeric order
    batches = tmp_path / "batches" / "test_batches"
    batches.mkdir(parents=True)
    for k, part in ((1, slice(0, 10)), (2, slice(10, 20)), (10, slice(20, 30))):
        write_affnist_mat(batches / f"{k}.mat", x[part], y[part])
    found = affnist.find_affnist(tmp_path / "batches")
    assert [p.name for p in found] == ["1.mat", "2.mat", "10.mat"]
    images, labels = affnist.read_affnist(found)
    assert torch.equal(images, x) and torch.equal(labels, y)
    assert affnist.find_affnist(tmp_path / "batches" / "nothing") == []


def test_a_malformed_mat_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "test.mat"
    bad.write_bytes(b"not a MATLAB file at all" * 10)
    with pytest.raises(DataError, match="not an affNIST .mat file") as info:
        affnist.read_affnist([bad])
    assert "\n" not in str(info.value)
    from scipy.io import savemat

    savemat(str(bad), {"affNISTdata": {"image": np.zeros((1600, 3), np.float64),
                                       "label_int": np.zeros((1, 3), np.uint8)}})  # fmt: skip
    with pytest.raises(DataError, match="expected uint8 1600 x 3"):
        affnist.read_affnist([bad])


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_the_40x40_models():
    capsnet = CapsNet(affnist.MODEL)
    # Conv1 -> 32x32, PrimaryCaps -> 12x12 grid: 4,608 primary capsules
    assert capsnet.config.num_primary == 32 * 12 * 12
    decoder = (160 * 512 + 512) + (512 * 1024 + 1024) + (1024 * 1600 + 1600)
    encoder = (81 * 256 + 256) + (256 * 256 * 81 + 256) + 4_608 * 10 * 16 * 8 + 160
    assert count(capsnet) == encoder + decoder == 13_475_808
    baseline = BaselineCNN(affnist.BASELINE)
    # the Table 1 layers, 2x2 max-pooling after the first two convolutions: 40 -> 20 -> 10
    convs = (25 * 256 + 256) + (25 * 256 * 256 + 256) + (25 * 256 * 128 + 128)
    fcs = (10 * 10 * 128 * 328 + 328) + (328 * 192 + 192) + (192 * 10 + 10)
    assert count(baseline) == convs + fcs == 6_728_466
    assert math.isclose(count(baseline) / count(capsnet), 0.5, abs_tol=0.01)
