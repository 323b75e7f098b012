"""The draw-a-digit app: its logic directly, then as a person uses it, in headless Chromium.

The browser test starts `launch/app.py MODEL --port P` as a subprocess, waits for the URL it
prints, and drives the page with Playwright (the `app-test` extra) in Debian's chromium
(/usr/bin/chromium, or CAPSFAST_CHROMIUM): upload an MNIST digit and read the prediction back,
draw a "1" with the mouse, move a capsule-dimension slider and see the reconstruction redrawn,
upload a 16-bit PNG and see the label `predict` gives it. Screenshots go to the test's tmp dir.
It skips, saying why, where gradio, playwright or chromium is not installed.

An upload must reach the app's analysis as `predict` reads the file: the same input, the same
label, for 16-bit, palette, RGBA and CMYK files (test_upload_reads_the_file_as_predict_does runs
gradio's own upload preprocessing and the function the upload event calls, without a browser).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capsfast.app import AppModel, _upscale, build_app
from capsfast.data import load_mnist
from capsfast.infer import ImageError, load_model, predict_files

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CAPSFAST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PREDICTED = re.compile(r"Prediction: (\d)")


@pytest.fixture(scope="module")
def digits():
    mnist = load_mnist()
    return mnist.test_images[:20, 0], mnist.test_labels[:20]  # [N, 28, 28]: the one channel


def test_app_logic(trained_model_dir, digits):
    """Without gradio: what the app shows for an upload, a sketchpad value and slider moves."""
    images, labels = digits
    logic = AppModel(load_model(trained_model_dir, device="cpu"))
    picture = 255 - images[0].numpy()  # dark on light, as drawn
    r = logic.analyse(picture)
    assert r["label"] == int(labels[0]) and len(r["lengths"]) == 10 and len(r["pose"]) == 16
    assert r["input"].shape == (1, 28, 28) and r["reconstruction"].shape == (1, 28, 28)
    # A gradio sketchpad value: RGBA composite with a transparent background.
    rgba = torch.zeros(28, 28, 4, dtype=torch.uint8)
    rgba[..., 3] = images[0]
    assert logic.analyse({"composite": rgba.numpy(), "layers": []})["label"] == r["label"]
    # Sliders at zero reproduce the reconstruction; moved, they change it.
    still = logic.decode(r["label"], r["pose"], [0.0] * 16)
    torch.testing.assert_close(still, r["reconstruction"], atol=1e-5, rtol=0)
    moved = logic.decode(r["label"], r["pose"], [0.25] + [0.0] * 15)
    assert (moved - still).abs().max() > 0.01
    with pytest.raises(ImageError, match="nothing drawn"):
        logic.analyse({"composite": None})
    with pytest.raises(ImageError, match="blank"):
        logic.analyse(torch.full((100, 100), 255, dtype=torch.uint8).numpy())


def _sixteen_bit(a):
    # Dark on light, full 16-bit range: an 8-bit conversion clips most of it to white.
    return Image.fromarray((65535 - a.astype(np.uint16) * 257).astype(np.uint16))


def _palette(a):
    return Image.fromarray(255 - a).convert("P", palette=Image.ADAPTIVE, colors=16)


def _rgba(a):
    rgba = np.zeros((*a.shape, 4), np.uint8)
    rgba[..., 3] = a  # black strokes on a transparent canvas
    return Image.fromarray(rgba, "RGBA")


def _cmyk(a):
    return Image.fromarray(255 - a).convert("CMYK")


UPLOADS = {"16bit.png": _sixteen_bit, "palette.png": _palette, "rgba.png": _rgba}
UPLOADS["cmyk.tif"] = _cmyk


def _upload_files(folder: Path, images) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(images.numpy()):
        big = Image.fromarray(a).resize((112, 112), Image.BILINEAR)
        for name, make in UPLOADS.items():
            path = folder / f"{i}_{name}"
            make(np.asarray(big)).save(path)
            paths.append(path)
    return paths


def test_upload_reads_the_file_as_predict_does(trained_model_dir, digits, tmp_path):
    """What gradio hands the upload handler, through the handler wired to the upload event,
    gives the input and label that `predict` gives for the same file."""
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'capsfast[app]')")
    from gradio import data_classes

    images, _ = digits
    paths = _upload_files(tmp_path / "uploads", images[:3])
    with Image.open(paths[0]) as img:
        assert img.mode.startswith("I") and np.asarray(img).max() > 255  # really 16-bit
    model = load_model(trained_model_dir, device="cpu")
    demo = build_app(model)
    upload = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "upload")
    fns = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    handler = next(f for f in fns if any(t[0] == upload._id for t in f.targets)).fn
    payload = getattr(data_classes, "ImageData", data_classes.FileData)
    cli = {r.path: r for r in predict_files(model, paths)}
    for path in paths:
        value = upload.preprocess(payload(path=str(path), orig_name=path.name))
        text, _, seen, _, state, *_ = handler(value)
        r = cli[path]
        assert r.ok, r.error
        assert state is not None, (path.name, text)  # the app read no digit where predict did
        assert state["label"] == r.label and f"Prediction: {r.label}" in text, path.name
        assert np.array_equal(seen, _upscale(r.input)), path.name  # the same 28x28 input
        # And the analysis itself: the exact tensor the CLI fed the model.
        assert torch.equal(AppModel(model).analyse(value)["input"], r.input), path.name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser_requirements():
    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.skip("gradio is not installed (pip install 'capsfast[app]')")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install 'capsfast[app-test]')")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or CAPSFAST_CHROMIUM)")


@pytest.fixture
def app_url(trained_model_dir, tmp_path):
    """Start launch/app.py as a person would; yield the URL it prints; stop it."""
    _browser_requirements()
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    env["GRADIO_TEMP_DIR"] = str(tmp_path / "gradio")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "app.py"), str(trained_model_dir)]
        + ["--port", str(port), "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: queue.Queue = queue.Queue()
    log: list[str] = []

    def read():
        for line in proc.stdout:
            log.append(line)
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    url = None
    deadline = time.monotonic() + 120
    try:
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if proc.poll() is not None:
                    break
                continue
            m = re.search(r"running at: (http://\S+)", line)
            if m:
                url = m.group(1)
        assert url, f"app printed no URL (exit {proc.poll()}):\n{''.join(log)}"
        assert url.startswith(f"http://127.0.0.1:{port}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _prediction(page) -> int:
    page.wait_for_function(
        "/Prediction: \\d/.test(document.querySelector('#prediction').innerText)", timeout=60_000
    )
    return int(PREDICTED.search(page.locator("#prediction").inner_text()).group(1))


def test_app_in_browser(app_url, trained_model_dir, digits, tmp_path):
    from playwright.sync_api import sync_playwright

    images, labels = digits
    digit = tmp_path / "digit.png"
    Image.fromarray(255 - images[0].numpy()).resize((140, 140), Image.BILINEAR).save(digit)
    # A 16-bit digit that the app read wrongly when gradio converted uploads to 8-bit RGBA.
    deep = _upload_files(tmp_path / "deep", images[1:2])[0]
    expected_deep = next(predict_files(load_model(trained_model_dir, device="cpu"), [deep])).label

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(60_000)
            page.goto(app_url, wait_until="domcontentloaded")
            page.wait_for_selector("#prediction")

            # Draw a "1": pick the brush, one vertical stroke down the middle of the canvas.
            page.wait_for_selector("#sketchpad canvas", state="visible")
            page.locator("#sketchpad button[aria-label=Brush]").click()
            box = page.locator("#sketchpad canvas").first.bounding_box()
            x = box["x"] + box["width"] / 2
            top, bottom = box["y"] + box["height"] * 0.2, box["y"] + box["height"] * 0.8
            page.mouse.move(x, top)
            page.mouse.down()
            for i in range(1, 21):
                page.mouse.move(x + i * 0.3, top + (bottom - top) * i / 20)
            page.mouse.up()
            assert _prediction(page) == 1
            page.screenshot(path=str(tmp_path / "app_drawn.png"), full_page=True)

            # Move dimension 3's slider (type into its box, as a person can): redrawn.
            before = page.locator("#reconstruction img").get_attribute("src")
            number = page.locator("#dim3 input[type=number]")
            number.fill("0.25")
            number.press("Enter")
            page.wait_for_function(
                f"document.querySelector('#reconstruction img').src !== {before!r}"
            )

            # Upload a picture of an MNIST test digit (dark on light, 140x140).
            page.get_by_role("tab", name="Upload").click()
            page.locator("#upload input[type=file]").set_input_files(str(digit))
            page.wait_for_function(
                "/Prediction: "
                + str(int(labels[0]))
                + "/.test(document.querySelector('#prediction').innerText)"
            )
            assert _prediction(page) == int(labels[0])
            # A new prediction puts the sliders back to zero.
            assert float(page.locator("#dim3 input[type=number]").input_value()) == 0
            bars = page.locator("#bars").inner_text()
            assert all(str(k) in bars for k in range(10))
            shot = tmp_path / "app_uploaded.png"
            page.screenshot(path=str(shot), full_page=True)

            # A 16-bit PNG, uploaded through the page: the label `predict` gives the same file.
            # Remove the picture first (the prediction goes back to none), so that the wait
            # below sees this upload's prediction even if it is the same digit.
            page.locator("#upload button[aria-label='Remove Image']").first.click()
            page.wait_for_function(
                "/Prediction:\\W*none/.test(document.querySelector('#prediction').innerText)"
            )
            page.locator("#upload input[type=file]").set_input_files(str(deep))
            page.wait_for_function(
                "/Prediction: "
                + str(expected_deep)
                + "/.test(document.querySelector('#prediction').innerText)"
            )
            assert _prediction(page) == expected_deep
        finally:
            browser.close()
    with Image.open(shot) as img:
        assert img.width >= 1000 and img.height >= 800
