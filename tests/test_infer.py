"""capsfast.infer and launch/predict.py: real MNIST test digits, saved as image files in the
styles people have them (inverted, RGB, large, off-centre, JPEG, transparent, EXIF-rotated), must
be read about as well as the model reads the original digits."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capsfast.data import MNIST_CLASSES, load_mnist, to_float
from capsfast.infer import (
    ImageError,
    expand_paths,
    load_model,
    main,
    predict,
    predict_files,
    preprocess,
    preprocess_array,
)

REPO = Path(__file__).resolve().parent.parent
N = 150  # test digits per style
TOLERANCE = 0.04  # accuracy on styled files may trail the model's own accuracy by this much


@pytest.fixture(scope="module")
def digits():
    mnist = load_mnist()
    return mnist.test_images[:N, 0], mnist.test_labels[:N]  # [N, 28, 28]: the one channel


@pytest.fixture(scope="module")
def model(trained_model_dir):
    return load_model(trained_model_dir, device="cpu")


@pytest.fixture(scope="module")
def model_accuracy(model, digits):
    images, labels = digits
    return float((predict(model, to_float(images)).labels == labels).float().mean())


# --- rendering digits in different styles -------------------------------------------------------


def _plain(a):
    return Image.fromarray(a)


def _inverted(a):
    return Image.fromarray(255 - a)  # dark ink on white paper


def _rgb(a):
    tint = np.array([0.9, 1.0, 0.8])  # coloured ink on black
    return Image.fromarray((a[..., None] * tint).astype(np.uint8), "RGB")


def _big(a):
    return Image.fromarray(a).resize((100, 100), Image.BILINEAR)


def _offcentre(a):
    # Dark-on-light, greyish paper, digit doubled in size in the lower right of a 160x120 page.
    page = np.full((120, 160), 225, np.uint8)
    big = np.asarray(Image.fromarray(255 - a).resize((56, 56), Image.BILINEAR))
    page[58:114, 96:152] = np.minimum(page[58:114, 96:152], big)
    return Image.fromarray(page)


def _transparent(a):
    # A drawing app's export: black strokes on a fully transparent background.
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = a
    return Image.fromarray(rgba, "RGBA").resize((84, 84), Image.BILINEAR)


STYLES = {
    "plain.png": _plain,
    "inverted.png": _inverted,
    "rgb.png": _rgb,
    "big100.png": _big,
    "offcentre.png": _offcentre,
    "jpeg.jpg": lambda a: _inverted(a).resize((64, 64), Image.BICUBIC).convert("RGB"),
    "transparent.png": _transparent,
}


def _write(folder: Path, images: torch.Tensor, style: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images.numpy()):
        path = folder / f"{i:04d}_{style}"
        STYLES[style](img).save(path, quality=95) if style.endswith(".jpg") else STYLES[style](
            img
        ).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("style", sorted(STYLES))
def test_styled_files_read_as_well_as_mnist(style, tmp_path, model, digits, model_accuracy):
    images, labels = digits
    paths = _write(tmp_path, images, style)
    results = list(predict_files(model, [tmp_path], batch_size=64))
    assert [r.path for r in results] == paths
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    predicted = torch.tensor([r.label for r in results])
    accuracy = float((predicted == labels).float().mean())
    assert accuracy >= model_accuracy - TOLERANCE, (style, accuracy, model_accuracy)
    assert all(len(r.lengths) == 10 and 0 <= min(r.lengths) for r in results)
    assert results[0].input.shape == (1, 28, 28) and results[0].reconstruction.shape == (1, 28, 28)


def test_preprocess_reproduces_mnist(digits):
    """MNIST digits are already MNIST-like: preprocessing them must change (almost) nothing."""
    images, _ = digits
    x = to_float(images)
    out = torch.stack([preprocess_array(img[0]) for img in x])
    assert out.shape == x.shape
    assert (out - x).abs().mean() < 0.002
    # The centre of mass lands on pixel (14, 14), as in MNIST.
    ys = torch.arange(28.0)
    cy = (out[:, 0].sum(2) * ys).sum(1) / out[:, 0].sum((1, 2))
    assert (cy - 14).abs().max() < 0.75


def test_offcentre_digit_is_centred_and_boxed(digits):
    """A digit drawn large in a corner of a grey page comes out like the MNIST original."""
    images, _ = digits
    for i in range(10):
        x = preprocess(_offcentre(images[i].numpy()))
        assert x.shape == (1, 28, 28) and float(x.max()) == pytest.approx(1.0)
        ink = x[0] > 0.05
        rows, cols = torch.nonzero(ink.any(1)).flatten(), torch.nonzero(ink.any(0)).flatten()
        assert max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) in (20, 21)  # the 20x20 box
        ys = torch.arange(28.0)
        assert float((x[0].sum(1) * ys).sum() / x.sum()) == pytest.approx(14, abs=0.75)
        assert float((x[0].sum(0) * ys).sum() / x.sum()) == pytest.approx(14, abs=0.75)
        # Like the original up to resampling blur and the rounding of the centring shift.
        original = to_float(images[i : i + 1])[0]
        corr = max(
            float(
                torch.corrcoef(
                    torch.stack([x.roll((dy, dx), (1, 2)).flatten(), original.flatten()])
                )[0, 1]
            )
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        )
        assert corr > 0.88, (i, corr)


def test_exif_orientation_is_applied(tmp_path, model, digits):
    images, labels = digits
    ok = 0
    for i in range(20):
        # Stored rotated by 90 degrees with EXIF orientation 6 ("rotate 90 CW to display").
        img = _inverted(images[i].numpy()).transpose(Image.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        path = tmp_path / f"{i}.jpg"
        img.convert("RGB").save(path, exif=exif, quality=95)
        x = preprocess(path)
        ok += int(predict(model, x[None]).labels[0] == labels[i])
    assert ok >= 18


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not an image"),
        (b"hello, not a picture\n", "not an image"),
        ("truncated", "corrupt"),
        ("blank", "blank image"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, content, message, digits):
    path = tmp_path / "bad.png"
    if content == "truncated":
        buf = io.BytesIO()
        _big(digits[0][0].numpy()).save(buf, "PNG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif content == "blank":
        Image.new("RGB", (50, 40), (255, 255, 255)).save(path)
    else:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        preprocess(path)


def test_expand_paths_keeps_files_and_searches_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "sub/c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    explicit = tmp_path / "notes.txt"
    assert expand_paths([tmp_path, explicit]) == [
        tmp_path / "a.JPG",
        tmp_path / "b.png",
        tmp_path / "sub" / "c.webp",
        explicit,
    ]


def _mixed_folder(folder: Path, images, n=6):
    good = _write(folder, images[:n], "inverted.png")
    (folder / "corrupt.png").write_bytes(good[0].read_bytes()[:60])
    (folder / "text.png").write_text("not an image\n")
    return good


def test_predict_cli_json_subprocess(tmp_path, trained_model_dir, digits):
    images, labels = digits
    folder = tmp_path / "in"
    good = _mixed_folder(folder, images)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    missing = tmp_path / "missing.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "predict.py"),
            "--model",
            str(trained_model_dir),
            "--device",
            "cpu",
            "--json",
            str(folder),
            str(notes),
            str(missing),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    by_path = {Path(r["path"]).name: r for r in records}
    assert len(records) == len(good) + 4
    for name in ("corrupt.png", "text.png", "notes.txt", "missing.png"):
        assert set(by_path[name]) == {"path", "error"} and by_path[name]["error"], name
    assert "no such file" in by_path["missing.png"]["error"]
    correct = 0
    for i, path in enumerate(good):
        r = by_path[path.name]
        assert set(r) == {"path", "label", "class_name", "lengths"}
        assert r["class_name"] == MNIST_CLASSES[r["label"]]  # e.g. "7 - seven"
        assert isinstance(r["label"], int) and len(r["lengths"]) == 10
        assert r["label"] == max(range(10), key=lambda k: r["lengths"][k])
        correct += r["label"] == int(labels[i])
    assert correct >= len(good) - 1


def test_predict_cli_text_output_and_reconstructions(tmp_path, trained_model_dir, digits, capsys):
    images, labels = digits
    folder = tmp_path / "in"
    good = _mixed_folder(folder, images, n=4)
    out = tmp_path / "recon"
    rc = main(
        ["--model", str(trained_model_dir), "--device", "cpu"]
        + ["--save-reconstructions", str(out), str(folder)]
    )
    captured = capsys.readouterr()
    assert rc == 1
    lines = captured.out.splitlines()
    assert len(lines) == len(good)
    assert lines[0].startswith(f"{good[0]}: ") and "lengths" in lines[0]
    err = captured.err.splitlines()
    assert any("corrupt.png" in line and "error" in line for line in err)
    assert any("text.png" in line and "not an image" in line for line in err)
    recon = sorted(out.glob("*.recon.png"))
    assert len(recon) == len(good)
    with Image.open(recon[0]) as img:
        assert img.size == (28, 28)
        assert np.asarray(img).std() > 5  # a digit, not a blank

    # Only good files: exit code 0.
    assert main(["--model", str(trained_model_dir), "--device", "cpu", *map(str, good)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(good)


def test_predict_cli_bad_model_dir(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "x.png"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_inference_modules_import_light():
    """infer, figures and app import neither gradio, matplotlib nor wandb until used."""
    code = (
        "import sys, capsfast, capsfast.infer, capsfast.figures, capsfast.app; "
        "print([m for m in ('gradio', 'matplotlib', 'wandb') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
