"""capsfast.infer and launch/predict.py: real MNIST test digits, saved as image files in the
styles people have them (inverted, RGB, large, off-centre, JPEG, transparent, EXIF-rotated,
16-bit), must be read about as well as the model reads the original digits; a file that cannot be
read (whatever the reason: a colour mode PIL cannot convert, NaN pixels, a broken or looping link)
costs that file only, with a line that says why."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capsfast import cli
from capsfast.data import MNIST_CLASSES, load_mnist, to_float
from capsfast.errors import UserError
from capsfast.infer import (
    ImageError,
    expand_paths,
    load_model,
    main,
    predict,
    predict_files,
    preprocess,
    preprocess_array,
    read_digit,
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
    # Through the entry point's error boundary, as launch/predict.py and capsfast-predict run it.
    assert cli.run("predict", ["--model", str(tmp_path), "x.png"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and err.startswith("predict: error: ") and err.count("\n") == 1


# --- files that fail: each costs itself only ------------------------------------------------------


def _lab_tiff(a, path):
    """A LAB-colour TIFF: PIL reads it but cannot convert it to grey (ValueError)."""
    Image.merge("LAB", [Image.fromarray(255 - a)] * 3).save(path)


def _nan_tiff(a, path):
    """A 32-bit float TIFF of the digit with one NaN pixel."""
    f = a.astype(np.float32) / 255
    f[0, 0] = np.nan
    Image.fromarray(f, "F").save(path)


def test_one_bad_file_costs_that_file_only(tmp_path, model, trained_model_dir, digits, capsys):
    """Files that fail in reading or conversion, for reasons of every kind, each get an error;
    every other file in the same batch is still predicted (and printed by the CLI)."""
    images, labels = digits
    folder = tmp_path / "in"
    good = _write(folder, images[:5], "inverted.png")
    _lab_tiff(images[5].numpy(), folder / "0005_lab.tif")
    _nan_tiff(images[6].numpy(), folder / "0006_nan.tif")
    (folder / "0007_truncated.png").write_bytes(good[0].read_bytes()[:70])
    results = {r.path.name: r for r in predict_files(model, [folder], batch_size=64)}
    assert len(results) == 8
    assert "LAB" in results["0005_lab.tif"].error
    assert "NaN" in results["0006_nan.tif"].error
    assert results["0007_truncated.png"].error
    ok = [results[p.name] for p in good]
    assert all(r.ok for r in ok)
    assert sum(r.label == int(y) for r, y in zip(ok, labels[:5], strict=True)) >= 4

    rc = main(["--model", str(trained_model_dir), "--device", "cpu", str(folder)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert [line.split(": ")[0] for line in out.splitlines()] == [str(p) for p in good]
    failed = [line for line in err.splitlines() if line.startswith("predict: error: ")]
    assert len(failed) == 3 and "predict: 3 of 8 files failed" in err


def test_read_digit_turns_every_failure_into_an_image_error(tmp_path, digits):
    a = digits[0][0].numpy()
    _lab_tiff(a, tmp_path / "lab.tif")
    with pytest.raises(ImageError, match="cannot read this image .ValueError"):
        read_digit(tmp_path / "lab.tif")
    with pytest.raises(ImageError, match="NaN"):
        read_digit(np.where(a > 0, np.nan, 0.0))  # an array, as the sketchpad sends them


def test_high_depth_files_read_as_their_8_bit_originals(tmp_path, digits):
    """16-bit PNG and float TIFF hold the same digit as the 8-bit file: same model input."""
    images, _ = digits
    for i in range(5):
        a = 255 - images[i].numpy()
        Image.fromarray(a).save(tmp_path / "8.png")
        Image.fromarray(a.astype(np.uint16) * 257).save(tmp_path / "16.png")
        Image.fromarray(a.astype(np.float32) / 255, "F").save(tmp_path / "f.tif")
        with Image.open(tmp_path / "16.png") as img:
            assert img.mode.startswith("I")  # really read as 16-bit
        x8 = read_digit(tmp_path / "8.png")
        torch.testing.assert_close(read_digit(tmp_path / "16.png"), x8, atol=1e-5, rtol=0)
        torch.testing.assert_close(read_digit(tmp_path / "f.tif"), x8, atol=1e-5, rtol=0)


def test_broken_and_looping_links_are_reported(tmp_path, model, digits):
    images, _ = digits
    folder = tmp_path / "in"
    good = _write(folder, images[:2], "plain.png")
    os.symlink("nowhere.png", folder / "dangling.png")
    os.symlink("loop.png", folder / "loop.png")
    os.symlink(good[0].name, folder / "alias.png")  # a working link is an ordinary file
    assert len(expand_paths([folder])) == 5
    results = {r.path.name: r for r in predict_files(model, [folder])}
    assert "dangling symbolic link" in results["dangling.png"].error
    assert "nowhere.png" in results["dangling.png"].error
    assert "symbolic link loop" in results["loop.png"].error
    assert results["alias.png"].ok and results["alias.png"].label == results[good[0].name].label


# --- where the CLI writes, and what it refuses --------------------------------------------------


@pytest.fixture
def model_copy(trained_model_dir, tmp_path) -> Path:
    """A copy of the exported model in tmp, for commands that write under the model's folder."""
    copy = tmp_path / "run" / "model"
    copy.mkdir(parents=True)
    for f in ("model.safetensors", "config.json"):
        shutil.copy(trained_model_dir / f, copy / f)
    return copy


def test_reconstructions_default_under_the_model(model_copy, tmp_path, digits, monkeypatch, capsys):
    images, _ = digits
    paths = _write(tmp_path / "in", images[:3], "plain.png")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["--model", str(model_copy), "--device", "cpu", *map(str, paths)]
    assert main([*args, "--save-reconstructions"]) == 0
    written = sorted(p.name for p in (model_copy / "reconstructions").iterdir())
    assert written == sorted(f"{p.stem}.{kind}.png" for p in paths for kind in ("recon", "input"))
    assert list(work.iterdir()) == []  # nothing in the current directory
    # A folder of other images (an input folder the option took as DIR) or a file is refused.
    for target, message in ((tmp_path / "in", "holds images"), (paths[0], "is a file")):
        with pytest.raises(UserError, match=message):
            main([*args, f"--save-reconstructions={target}"])
    assert len(list((tmp_path / "in").iterdir())) == 3  # nothing written into the inputs
    capsys.readouterr()


def _huge_png(path: Path, side: int) -> Path:
    """A valid 1-bit PNG of side x side pixels, all black, in a few kilobytes (a decompression
    bomb: its pixels would take gigabytes once decoded and converted)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    raw = zlib.compressobj(9)
    packed = b"".join(raw.compress(row) for _ in range(side)) + raw.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", packed)
    path.write_bytes(png + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, digits, capsys, recwarn):
    # 13000 x 13000 (169 MP: PIL would only warn, then decode it, 3.5 GB for predict) and
    # 20000 x 20000 (400 MP: PIL's own error): both one line, nothing decoded; the ordinary
    # picture beside them is still predicted.
    images, _ = digits
    (good,) = _write(tmp_path / "in", images[:1], "plain.png")
    big = _huge_png(tmp_path / "in" / "big.png", 13000)
    huge = _huge_png(tmp_path / "in" / "huge.png", 20000)
    assert big.stat().st_size < 100_000
    assert main(["--model", "mnist", "--device", "cpu", str(good), str(big), str(huge)]) == 1
    out, err = capsys.readouterr()
    assert str(good) in out
    errors = [line for line in err.splitlines() if line.startswith("predict: error:")]
    assert len(errors) == 2, err
    assert f"{big}: too large to decode safely: 13000x13000 pixels, 169.0 megapixels" in err
    assert f"{huge}: too large to decode safely: 400.0 megapixels" in err
    assert "over the limit of 89.5 megapixels" in errors[0] and "downscale it" in errors[0]
    assert "DecompressionBomb" not in err
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]
