"""The trained model shipped inside the package (`mnist`): it loads offline by name through
every entry point, its weights are the record's, and a directory of the same name wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import capsfast
from capsfast.data import load_mnist, to_float
from capsfast.export import SHIPPED_DIR, save_model, shipped_models
from capsfast.model import CapsNet, ModelConfig, correct
from tests.test_infer import _inverted, _offcentre, _transparent

REPO = Path(__file__).resolve().parent.parent
SHIPPED = SHIPPED_DIR / "mnist"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "NO_PROXY": "*",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # fmt: skip


def run(*args, cwd=REPO):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=OFFLINE,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((SHIPPED / "config.json").read_text())["meta"]


def test_the_mnist_model_ships_in_half_precision_with_its_card(meta):
    assert "mnist" in shipped_models()
    weights = SHIPPED / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    # The shipped weights' own figure, measured on all 10,000 test images when shipped: the
    # project's floor, and within 0.02 points of the record run's float32 export.
    assert meta["test_accuracy"] >= 0.9935
    assert abs(meta["test_accuracy"] - meta["record_test_accuracy"]) <= 0.0002
    card = (SHIPPED / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: capsfast\n")
    assert f"value: {round(meta['test_accuracy'] * 100, 2)}" in card
    assert "on 10000 test images" in card and "--preset cpu-record" in card


def test_load_model_by_name_and_its_accuracy_on_1000_test_images(meta):
    model = capsfast.load_model("mnist")
    assert isinstance(model, CapsNet) and not model.training
    assert next(model.parameters()).dtype == torch.float32  # fp16 on disk, fp32 to compute
    data = load_mnist()
    with torch.no_grad():
        scores = torch.cat([model(to_float(data.test_images[i : i + 500])).scores
                            for i in (0, 500)])  # fmt: skip
    accuracy = correct(scores, data.test_labels[:1000]).float().mean().item()
    # Broken weights or broken preprocessing would fall far below the record's figure.
    assert accuracy >= meta["record_test_accuracy"] - 0.005


def _hand_drawn(digit: int) -> Image.Image:
    """A digit drawn with a thick pen, dark on white, on a 200x200 page."""
    page = Image.new("L", (200, 200), 255)
    pen = ImageDraw.Draw(page)
    strokes = {
        0: lambda: pen.ellipse((60, 30, 140, 170), outline=0, width=14),
        1: lambda: pen.line((100, 30, 100, 170), fill=0, width=14),
        7: lambda: pen.line((55, 40, 145, 40, 85, 170), fill=0, width=14, joint="curve"),
    }
    strokes[digit]()
    return page


def test_predict_with_the_shipped_model_on_pictures_a_person_makes(tmp_path):
    data = load_mnist()
    expected = {}
    for i in range(12):  # MNIST test digits as a person's photos and drawing-app exports
        style = (_inverted, _offcentre, _transparent)[i % 3]
        path = tmp_path / f"digit{i}.png"
        style(data.test_images[i, 0].numpy()).save(path)
        expected[path.name] = int(data.test_labels[i])
    for digit in (0, 1, 7):  # and a few drawn with a pen
        _hand_drawn(digit).save(tmp_path / f"pen{digit}.png")
        expected[f"pen{digit}.png"] = digit
    r = run(REPO / "launch" / "predict.py", "--model", "mnist", "--json", tmp_path)
    assert r.returncode == 0, r.stderr
    got = {Path(rec["path"]).name: rec["label"] for rec in map(json.loads, r.stdout.splitlines())}
    assert got == expected


def test_a_directory_named_mnist_wins_over_the_shipped_model(tmp_path):
    # Another model, saved as ./mnist: a path that exists is that path.
    torch.manual_seed(0)
    other = CapsNet(ModelConfig(primary_types=2))
    save_model(other, tmp_path / "mnist")
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        loaded = capsfast.load_model("mnist")
    finally:
        os.chdir(cwd)
    assert loaded.config.primary_types == 2
    # Through the command line too: the empty folder ./mnist is a path, and not a model.
    empty = tmp_path / "elsewhere"
    (empty / "mnist").mkdir(parents=True)
    picture = tmp_path / "d.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(picture)
    r = run(REPO / "launch" / "predict.py", "--model", "mnist", picture, cwd=empty)
    assert r.returncode == 2 and "mnist/config.json not found" in r.stderr
    assert "Traceback" not in r.stderr
    r = run(REPO / "launch" / "predict.py", "--help")
    assert "an existing directory of that name wins" in " ".join(r.stdout.split())


def test_visualize_the_shipped_model_writes_beside_the_user_not_into_the_package(tmp_path):
    r = run(REPO / "launch" / "visualize.py", "mnist", "--test-size", "40", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in (tmp_path / "mnist-figures").iterdir())
    assert written and all(name.endswith(".png") for name in written)
    assert not (SHIPPED / "figures").exists()


def test_the_app_without_a_model_serves_the_shipped_one(tmp_path):
    import socket

    from capsfast.app import DEFAULT_MODEL

    assert DEFAULT_MODEL == "mnist"
    # A folder named mnist here must not be taken for it: the app with no argument means the
    # shipped model. A port in use stops the app after the model loaded, before gradio starts.
    (tmp_path / "mnist").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run(REPO / "launch" / "app.py", "--port", port, "--device", "cpu", cwd=tmp_path)
    assert "app: no model given: using the shipped model 'mnist'" in r.stdout, r.stderr
    assert r.returncode == 2 and f"{port}" in r.stderr and "Traceback" not in r.stderr
