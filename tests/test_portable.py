"""capsfast.portable and `capsfast-export`: a trained model's inference graph as ONNX and as a
torch.export .pt2 file, each run as a user runs it (onnxruntime; torch.export.load) against the
eager model on MNIST test digits at two batch sizes, beyond the batches the export checks itself;
docs/deploy.md's Deploy lines on a picture file; the baseline CNN; and the errors, one line each."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from capsfast import cli
from capsfast.baseline import BaselineCNN, BaselineConfig
from capsfast.data import load_mnist, to_float
from capsfast.errors import UserError
from capsfast.export import load_model
from capsfast.infer import predict_files
from capsfast.model import CapsNet, ModelConfig
from capsfast.portable import FORMATS, TOLERANCE, export_model, export_program, main

REPO = Path(__file__).resolve().parent.parent
BATCHES = (1, 16)  # the user's batches here; the export checked itself at 1 and 8
CAPSNET_OUTPUTS = ["lengths", "poses", "reconstructions"]


def _digits(start: int, n: int) -> torch.Tensor:
    """Test digits from `start` on: not the first ones, which the export's own check used."""
    return to_float(load_mnist().test_images[start : start + n])


def _run(fmt: str, path: Path, x: torch.Tensor) -> tuple[list[str] | None, list[torch.Tensor]]:
    """The file's outputs on x (and the ONNX output names), as a user would run it."""
    if fmt == "pt2":
        with torch.no_grad():
            return None, list(torch.export.load(str(path)).module()(x))
    ort = pytest.importorskip("onnxruntime", reason="pip install -e '.[export]'")
    session = ort.InferenceSession(str(path))
    names = [o.name for o in session.get_outputs()]
    return names, [torch.from_numpy(a) for a in session.run(None, {"images": x.numpy()})]


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_exported_trained_model_computes_what_eager_computes(fmt, trained_model_dir, tmp_path,
                                                                capsys):  # fmt: skip
    if fmt == "onnx":
        pytest.importorskip("onnxscript", reason="pip install -e '.[export]'")
    out = tmp_path / f"model.{fmt}"
    args = [str(trained_model_dir), "--format", fmt, "--output", str(out)]
    assert cli.run("export", args) == 0
    assert "largest differences" in capsys.readouterr().out
    model = load_model(trained_model_dir)
    for batch in BATCHES:
        x = _digits(100, batch)
        with torch.no_grad():
            eager = model(x)
        names, got = _run(fmt, out, x)
        assert names in (None, CAPSNET_OUTPUTS)
        want = [eager.lengths, eager.poses, eager.reconstructions]
        for name, g, w in zip(CAPSNET_OUTPUTS, got, want, strict=True):
            assert g.shape == w.shape, name
            assert float((g - w).abs().max()) <= TOLERANCE, (name, batch)
        assert torch.equal(got[0].argmax(1), eager.lengths.argmax(1))


def test_the_deploy_guide_lines_predict_as_predict_does(trained_model_dir, tmp_path):
    """docs/deploy.md's Deploy block, run as written (its paths swapped for this test's), on an
    inverted, enlarged picture file: the class is the one `predict` gives the same file."""
    pytest.importorskip("onnxruntime", reason="pip install -e '.[export]'")
    pytest.importorskip("onnxscript", reason="pip install -e '.[export]'")
    guide = (REPO / "docs" / "deploy.md").read_text()
    block = re.search(r"## Deploy\n.*?```python\n(.*?)```", guide, re.S).group(1)
    export_model(load_model(trained_model_dir), "onnx", tmp_path / "capsnet.onnx")
    digit = load_mnist().test_images[7, 0].numpy()
    picture = tmp_path / "seven.png"
    Image.fromarray(255 - digit).resize((84, 84)).save(picture)
    for name, path in (("runs/capsnet/model", trained_model_dir), ("seven.png", picture),
                       ("capsnet.onnx", tmp_path / "capsnet.onnx")):  # fmt: skip
        assert f'"{name}"' in block, name
        block = block.replace(f'"{name}"', repr(str(path)))
    namespace: dict = {}
    exec(block, namespace)
    (expected,) = predict_files(load_model(trained_model_dir), [picture])
    assert int(namespace["lengths"].argmax(1)[0]) == expected.label
    assert namespace["lengths"][0] == pytest.approx(expected.lengths, abs=TOLERANCE)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_baseline_exports_its_probabilities(fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="pip install -e '.[export]'")
    torch.manual_seed(0)
    model = BaselineCNN(BaselineConfig(conv_channels=(4, 4, 2), hidden=(8, 8))).eval()
    worst = export_model(model, fmt, tmp_path / f"baseline.{fmt}")
    assert list(worst) == ["probabilities"]  # no decoder: no poses, no reconstruction
    x = _digits(200, 3)
    names, (got,) = _run(fmt, tmp_path / f"baseline.{fmt}", x)
    assert names in (None, ["probabilities"])
    with torch.no_grad():
        want = model(x).logits.softmax(1)
    assert float((got - want).abs().max()) <= TOLERANCE
    assert torch.allclose(got.sum(1), torch.ones(3), atol=1e-5)


def test_onnx_keeps_the_eps_of_short_capsules(tmp_path):
    """An untrained model's capsules are ~1e-4 long, where squash's and the length's 1e-8 eps
    matter: onnxscript's optimizer would drop them (capsfast.portable.write_onnx)."""
    pytest.importorskip("onnxruntime", reason="pip install -e '.[export]'")
    torch.manual_seed(0)
    model = CapsNet(ModelConfig(conv_channels=16, primary_types=4, decoder_hidden=(16, 32)))
    worst = export_model(model.eval(), "onnx", tmp_path / "tiny.onnx")
    x = _digits(300, 2)
    with torch.no_grad():
        lengths = model(x).lengths
    assert float(lengths.max()) < 1e-3  # short indeed
    assert worst["lengths"] < 1e-6, worst  # relative error under 1%, not ~50%


def test_model_may_be_a_shipped_models_name(tmp_path, monkeypatch, capsys):
    import capsfast.export

    torch.manual_seed(0)
    model = CapsNet(ModelConfig(conv_channels=16, primary_types=4, decoder_hidden=(16, 32)))
    capsfast.export.save_model(model, tmp_path / "models" / "tiny")
    monkeypatch.setattr(capsfast.export, "SHIPPED_DIR", tmp_path / "models")
    monkeypatch.chdir(tmp_path)  # no ./tiny here: the name is the shipped model's
    assert cli.run("export", ["tiny", "--format", "pt2", "--output", "tiny.pt2"]) == 0
    assert "wrote tiny.pt2" in capsys.readouterr().out
    _, (lengths, *_) = _run("pt2", tmp_path / "tiny.pt2", _digits(0, 2))
    with torch.no_grad():
        assert torch.equal(lengths, model.eval()(_digits(0, 2)).lengths)


def test_a_bad_model_path_is_one_line(tmp_path, capsys):
    out = tmp_path / "model.pt2"
    assert cli.run("export", [str(tmp_path / "nope"), "--format", "pt2", "--output", str(out)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("export: error: ") and "no such model directory" in line
    assert not out.exists()


def test_onnx_without_the_export_extra_is_one_line(tmp_path):
    """The extra missing, simulated in a fresh `python launch/export.py`: its modules' imports
    fail as an absent package's do (None in sys.modules)."""
    argv = ["launch/export.py", str(tmp_path / "m"), "--format", "onnx", "--output", "m.onnx"]
    code = (
        "import runpy, sys\n"
        "for name in ('onnxscript', 'onnxruntime'): sys.modules[name] = None\n"
        f"sys.argv = {argv!r}\n"
        "sys.path.insert(0, 'launch')\n"
        "runpy.run_path('launch/export.py', run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("export: error: --format onnx needs onnxscript"), line
    assert "capsfast[export]" in line


def test_a_graph_that_cannot_be_exported_is_one_line():
    class DataDependent(nn.Module):  # control flow on a value: no graph can hold it
        def forward(self, images):
            return (images * 2,) if images.sum() > 0 else (images,)

    with pytest.raises(UserError) as e:
        export_program(DataDependent(), torch.rand(2, 1, 28, 28))
    assert "\n" not in str(e.value) and "cannot be exported" in str(e.value)


def test_help_says_why_routing_is_the_reference(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "the Triton kernels have no ONNX form" in text and "--format {onnx,pt2}" in text
