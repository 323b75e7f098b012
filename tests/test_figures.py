"""capsfast.figures and launch/visualize.py on the briefly trained model."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capsfast.data import load_mnist, to_float
from capsfast.figures import (
    DELTAS,
    GAP,
    confusion_matrix,
    grid,
    most_confident_wrong,
    perturb_capsule,
    plot_curves,
    save_figures,
)
from capsfast.infer import Prediction, load_model, predict

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(trained_model_dir):
    return load_model(trained_model_dir, device="cpu")


@pytest.fixture(scope="module")
def test_set():
    mnist = load_mnist()
    return mnist.test_images[:300, 0], mnist.test_labels[:300]  # [N, 28, 28]: the one channel


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("L"))


def test_grid_layout():
    """The figures' grids (torchvision's make_grid): image k at row k // ncols, column
    k % ncols, GAP white pixels around each; the perturbation figure's ticks rely on it."""
    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 1, 3, 4) / 10
    image = grid(images, ncols=2)
    assert GAP == 2
    assert image.shape == (3 * (3 + GAP) + GAP, 2 * (4 + GAP) + GAP)
    cell = lambda r, c: image[GAP + r * (3 + GAP), GAP + c * (4 + GAP)]  # top-left pixel
    assert cell(0, 0) == 0.0 and cell(0, 1) == pytest.approx(0.1)
    assert cell(1, 0) == pytest.approx(0.2) and cell(2, 0) == pytest.approx(0.4)
    assert cell(2, 1) == 1.0 and image[0, 0] == 1.0  # the empty sixth cell and the gaps: white


def test_perturbation_tensor(model, test_set):
    images, labels = test_set
    x = to_float(images[:1])[0]
    recon, label = perturb_capsule(model, x)
    assert recon.shape == (16, 11, 28, 28) and len(DELTAS) == 11
    assert DELTAS[0] == -0.25 and DELTAS[5] == 0 and DELTAS[-1] == 0.25
    assert label == int(labels[0])
    assert 0 <= float(recon.min()) and float(recon.max()) <= 1
    # The middle column (delta 0) is the model's own reconstruction, in every row.
    own = predict(model, x[None]).reconstructions[0, 0]
    torch.testing.assert_close(recon[:, 5], own.expand(16, 28, 28), atol=1e-5, rtol=0)
    # Moving a dimension changes the picture, more the further it moves.
    change = (recon - recon[:, 5:6]).abs().mean((2, 3))  # [16, 11]
    assert float(change[:, 0].min()) > 0 and float(change[:, -1].min()) > 0
    # Each row moves its own dimension: rows differ from one another.
    rows = recon[:, 0].flatten(1)
    assert float(torch.cdist(rows, rows).add(torch.eye(16) * 1e9).min()) > 1e-3
    assert int((change[:, 0] > change[:, 4]).sum()) >= 12
    assert int((change[:, 10] > change[:, 6]).sum()) >= 12


def test_confusion_matrix_counts():
    predicted = torch.tensor([0, 1, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 2, 2, 2, 0])
    cm = confusion_matrix(predicted, labels, num_classes=3)
    assert cm.tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]  # rows true, columns predicted


def test_most_confident_wrong_order():
    lengths = torch.tensor(
        [[0.9, 0.1], [0.2, 0.7], [0.6, 0.3], [0.1, 0.95], [0.8, 0.2]]
    )  # predicted 0, 1, 0, 1, 0
    pred = Prediction(lengths.argmax(1), lengths, torch.zeros(5, 2, 16), torch.zeros(5, 1, 28, 28))
    labels = torch.tensor([0, 0, 1, 0, 1])  # wrong: 1 (0.7), 2 (0.6), 3 (0.95), 4 (0.8)
    assert most_confident_wrong(pred, labels, k=3).tolist() == [3, 4, 1]
    assert most_confident_wrong(pred, lengths.argmax(1)).numel() == 0


def test_save_figures(model, test_set, tmp_path):
    images, labels = test_set
    model.train()  # the trainer calls it mid-run: the mode must come back as it was
    try:
        paths = save_figures(model, images, labels, tmp_path / "figs", max_images=200)
        assert model.training
    finally:
        model.eval()
    assert set(paths) == {
        "reconstructions",
        "capsule_dimensions",
        "confusion_matrix",
        "confident_wrong",
    }
    sizes = {}
    for name, path in paths.items():
        assert path.parent == tmp_path / "figs" and path.suffix == ".png", name
        pixels = _png(path)
        sizes[name] = pixels.shape
        assert min(pixels.shape) >= 200 and pixels.std() > 15, (name, pixels.shape, pixels.std())
    assert sizes["confusion_matrix"] == (600, 700)
    h, w = sizes["capsule_dimensions"]
    assert h > w  # 16 rows of 11 columns


def test_save_figures_accepts_float_images(model, test_set, tmp_path):
    images, labels = test_set
    paths = save_figures(model, to_float(images[:30]), labels[:30], tmp_path, device="cpu")
    assert all(p.is_file() for p in paths.values())


def test_plot_curves(tmp_path):
    # A run shorter than an epoch: five logged windows and the final validation. Each is drawn
    # against the step (one dot per epoch would leave this run a single dot).
    records = [
        {"kind": "train", "step": 10 * k, "epoch": k / 50, "train_loss": 0.3 / k,
         "margin_loss": 0.2 / k, "recon_loss": 0.1 / k, "train_accuracy": 0.5 + k / 20,
         "lr": 1e-3 * 0.96**k}
        for k in range(1, 6)
    ] + [{"kind": "epoch", "step": 50, "epoch": 0.1, "val_accuracy": 0.8, "train_loss": 0.1}]  # fmt: skip
    path = plot_curves(records, tmp_path / "curves.png")
    pixels = _png(path)
    assert pixels.shape == (450, 1500) and pixels.std() > 10
    # An empty history still draws (panels say "no data"), and differs from the one with data.
    empty = _png(plot_curves([], tmp_path / "empty.png"))
    assert empty.shape == (450, 1500)
    assert (pixels != empty).any(axis=-1).mean() > 0.02, "the curves drew nothing"
    one_window = _png(plot_curves(records[:1], tmp_path / "one.png"))
    assert (one_window != empty).any(axis=-1).mean() > 0.005, "a single logged window is invisible"


def test_visualize_cli(trained_model_dir, tmp_path):
    out = tmp_path / "figs"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "visualize.py"), str(trained_model_dir)]
        + ["--out", str(out), "--test-size", "200", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [
        "capsule_dimensions.png",
        "confident_wrong.png",
        "confusion_matrix.png",
        "reconstructions.png",
    ]
    assert "confusion_matrix: " in proc.stdout


def test_visualize_default_output_says_what_it_does(trained_model_dir, tmp_path):
    """Without --out the figures go to MODEL/figures (not the current directory); the command
    says which model, how many test images of which data set, on which device, how long, and
    shows a progress bar."""
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    for f in ("model.safetensors", "config.json"):
        shutil.copy(trained_model_dir / f, model / f)
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "visualize.py"), str(model)]
        + ["--test-size", "100", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list((model / "figures").glob("*.png"))) == 4
    assert list(work.iterdir()) == []
    first = proc.stdout.splitlines()[0]
    assert str(model) in first and "100 MNIST test images" in first and "on cpu" in first
    assert re.search(r"4 figures in \S+ \d+\.\d s", proc.stdout)
    assert "evaluating" in proc.stderr and "100/100" in proc.stderr  # tqdm
