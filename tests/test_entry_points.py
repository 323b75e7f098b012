"""Every inference entry point, run the way a user runs it (`python launch/NAME.py ...`, a
process of its own), against bad input: exit status 2 (1 for predict when some files failed),
exactly one `PROG: error: ...` line on stderr, and no traceback.

The table is CASES. A row names the entry point (capsfast.cli.ENTRY_POINTS: launch/<entry>.py),
its arguments, a fragment the error line must contain, and the exit status. Arguments may use
"{name}" for an input from INPUTS, built under the row's tmp dir only when the row uses it; add
an input there when a new row needs one. The selected rows run together: each in a process of
its own forked by tests/entry_point_runner.py after one `import torch` (about 2 s of CPU a
process otherwise), and the rows marked fresh=True, one per entry point, as a plain
`python launch/NAME.py`, imports included. Then each row's test checks its own result.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capsfast.cli import ENTRY_POINTS
from capsfast.export import CONFIG, WEIGHTS, save_model
from capsfast.model import CapsNet

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    id: str
    entry: str  # a key of capsfast.cli.ENTRY_POINTS
    args: tuple[str, ...]
    message: str  # must appear in the one error line
    code: int = 2
    fresh: bool = False  # run as a plain `python launch/NAME.py`, not forked after the imports


# --- inputs: name -> build(Inputs) -> the string that replaces "{name}" ------------------------


class Inputs:
    """Builds the named inputs of one row under `tmp`; `keep` holds what must stay open."""

    def __init__(self, tmp: Path, model: Path):
        self.tmp, self.model, self.keep = tmp, model, []

    def model_with_config(self, name: str, edit: Callable[[dict], object]) -> Path:
        """A copy of the good model whose config.json is edit(config) (written as JSON)."""
        out = self.tmp / name
        out.mkdir()
        (out / WEIGHTS).symlink_to(self.model / WEIGHTS)
        config = json.loads((self.model / CONFIG).read_text())
        (out / CONFIG).write_text(json.dumps(edit(config)))
        return out

    def model_with_weights(self, name: str, data: bytes) -> Path:
        out = self.tmp / name
        out.mkdir()
        shutil.copy(self.model / CONFIG, out / CONFIG)
        (out / WEIGHTS).write_bytes(data)
        return out

    def folder(self, name: str, bad: Callable[[Path], None]) -> Path:
        """A folder with one good digit and one bad file made by bad(folder)."""
        out = self.tmp / name
        out.mkdir()
        shutil.copy(_digit(self.tmp), out / "good.png")
        bad(out)
        return out


def _digit(tmp: Path) -> Path:
    path = tmp / "digit.png"
    if not path.exists():
        a = np.zeros((28, 28), np.uint8)
        a[4:24, 12:16] = 255  # a "1"
        Image.fromarray(a).save(path)
    return path


def _empty_dir(tmp: Path) -> Path:
    (tmp / "empty").mkdir(exist_ok=True)
    return tmp / "empty"


def _drop_conv_channels(c):
    del c["model"]["conv_channels"]
    return c


def _nan_weights(model: Path) -> bytes:
    from safetensors.torch import load_file, save

    state = load_file(model / WEIGHTS)
    state["conv1.bias"][0] = float("nan")
    return save(state)


def _busy_port(inputs: Inputs) -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    inputs.keep.append(s)
    return str(s.getsockname()[1])


def _lab(folder: Path) -> None:
    Image.merge("LAB", [Image.new("L", (28, 28), 128)] * 3).save(folder / "lab.tif")


def _nan(folder: Path) -> None:
    f = np.zeros((28, 28), np.float32)
    f[4:24, 12:16], f[0, 0] = 1.0, np.nan
    Image.fromarray(f, "F").save(folder / "nan.tif")


INPUTS: dict[str, Callable[[Inputs], object]] = {
    "model": lambda i: i.model,
    "digit": lambda i: _digit(i.tmp),
    "weights_file": lambda i: i.model / WEIGHTS,
    "missing": lambda i: i.tmp / "missing",
    "file": lambda i: _digit(i.tmp),
    "empty_dir": lambda i: _empty_dir(i.tmp),
    "list_config": lambda i: i.model_with_config("list", lambda c: [1, 2]),
    "missing_key": lambda i: i.model_with_config("missing_key", _drop_conv_channels),
    "typed_key": lambda i: i.model_with_config(
        "typed", lambda c: {**c, "model": {**c["model"], "conv_channels": "256"}}
    ),
    "no_model_section": lambda i: i.model_with_config(
        "no_model", lambda c: {k: v for k, v in c.items() if k != "model"}
    ),
    "truncated_weights": lambda i: i.model_with_weights(
        "truncated", (i.model / WEIGHTS).read_bytes()[:5000]
    ),
    "garbage_weights": lambda i: i.model_with_weights("garbage", os.urandom(4096)),
    "nan_weights": lambda i: i.model_with_weights("nan", _nan_weights(i.model)),
    "narrower_config": lambda i: i.model_with_config(
        "narrower", lambda c: {**c, "model": {**c["model"], "conv_channels": 128}}
    ),
    "busy_port": _busy_port,
    "lab_folder": lambda i: i.folder("lab", _lab),
    "nan_folder": lambda i: i.folder("nan", _nan),
    "dangling_folder": lambda i: i.folder(
        "dangling", lambda f: (f / "gone.png").symlink_to("nowhere.png")
    ),
    "loop_folder": lambda i: i.folder("loop", lambda f: (f / "loop.png").symlink_to("loop.png")),
}

CPU = ("--device", "cpu")
TRITON_ON_CPU = "Use --routing auto or torch"  # capsfast.routing_choice, for every entry point


def _model_rows(entry: str, model_flag: tuple[str, ...], tail: tuple[str, ...]) -> list[Case]:
    """The broken-model rows, for an entry point that takes the model as model_flag + path."""
    rows = [
        ("config-not-object", "list_config", "not an object"),
        ("config-missing-key", "missing_key", "'conv_channels'] are missing"),
        ("config-ill-typed", "typed_key", "'conv_channels' is '256', must be a positive int"),
        ("config-no-model-section", "no_model_section", 'no "model" section'),
        ("weights-truncated", "truncated_weights", "unreadable or corrupt"),
        ("weights-garbage", "garbage_weights", "unreadable or corrupt"),
        ("weights-nan", "nan_weights", "NaN or infinite weights in ['conv1.bias']"),
        ("weights-do-not-fit-config", "narrower_config", "does not match config.json"),
        ("model-is-a-file", "weights_file", "is a file, not a model directory"),
        ("model-missing", "missing", "no such model directory"),
    ]
    return [
        Case(f"{entry}-{name}", entry, (*model_flag, f"{{{inp}}}", *tail), message)
        for name, inp, message in rows
    ]


CASES: list[Case] = [
    *_model_rows("predict", ("--model",), (*CPU, "{digit}")),
    Case(
        "predict-recon-dir-is-a-file",
        "predict",
        ("--model", "{model}", *CPU, "--save-reconstructions={file}", "{digit}"),
        "is a file: give a directory",
    ),
    Case(
        "predict-triton-on-cpu",
        "predict",
        ("--model", "{model}", *CPU, "--routing", "triton", "{digit}"),
        TRITON_ON_CPU,
    ),
    Case(
        "predict-fused-on-cpu",
        "predict",
        ("--model", "{model}", *CPU, "--routing", "fused", "{digit}"),
        TRITON_ON_CPU,
    ),
    Case(
        "predict-no-such-gpu",
        "predict",
        ("--model", "{model}", "--device", "cuda:99", "{digit}"),
        "use --device cpu",
    ),
    Case(
        "predict-device-typo",
        "predict",
        ("--model", "{model}", "--device", "gpu", "{digit}"),
        "--device gpu cannot be used",
    ),
    Case(
        "predict-no-images",
        "predict",
        ("--model", "{model}", *CPU, "{empty_dir}"),
        "no image files",
    ),
    Case(
        "predict-batch-size-0",
        "predict",
        ("--model", "{model}", "--batch-size", "0", "{digit}"),
        "--batch-size must be at least 1",
    ),
    # Some files failed: exit 1, the good file still predicted (checked in test_entry_point).
    Case(
        "predict-lab-tiff",
        "predict",
        ("--model", "{model}", *CPU, "{lab_folder}"),
        "LAB",
        1,
        fresh=True,
    ),
    Case("predict-nan-tiff", "predict", ("--model", "{model}", *CPU, "{nan_folder}"), "NaN", 1),
    Case(
        "predict-dangling-link",
        "predict",
        ("--model", "{model}", *CPU, "{dangling_folder}"),
        "dangling symbolic link",
        1,
    ),
    Case(
        "predict-link-loop",
        "predict",
        ("--model", "{model}", *CPU, "{loop_folder}"),
        "symbolic link loop",
        1,
    ),
    *_model_rows("visualize", (), (*CPU, "--test-size", "10")),
    Case(
        "visualize-triton-on-cpu",
        "visualize",
        ("{model}", *CPU, "--routing", "triton", "--test-size", "10"),
        TRITON_ON_CPU,
        fresh=True,
    ),
    Case(
        "visualize-out-is-a-file",
        "visualize",
        ("{model}", *CPU, "--out", "{file}", "--test-size", "10"),
        "is a file: give a directory",
    ),
    Case(
        "visualize-data-dir-empty",
        "visualize",
        ("{model}", *CPU, "--data-dir", "{empty_dir}", "--test-size", "10"),
        "--data-dir",
    ),
    *_model_rows("app", (), CPU),
    Case("app-fused-on-cpu", "app", ("{model}", *CPU, "--routing", "fused"), TRITON_ON_CPU),
    Case(
        "app-port-in-use",
        "app",
        ("{model}", *CPU, "--port", "{busy_port}"),
        "already in use (another app or server): choose another with --port",
        fresh=True,
    ),
]


# --- running ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    """An exported model with random weights: loading, not accuracy, is what these rows test."""
    return save_model(CapsNet(), tmp_path_factory.mktemp("entry_points") / "model")


def _env() -> dict[str, str]:
    # No Triton interpreter (as a user's shell has none: triton on CPU must be refused), no GPU
    # (the rows mean the same on every machine), no W&B.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def outcomes(request, good_model, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Run every selected row; {case id: its process's exit status, stdout and stderr}."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.module is request.module
        and hasattr(item, "callspec")
        and "case" in item.callspec.params
    ]
    jobs, open_inputs = {}, []
    for case in selected:
        tmp = tmp_path_factory.mktemp(case.id)
        inputs = Inputs(tmp, good_model)
        open_inputs.append(inputs)
        values = {}
        for name, build in INPUTS.items():
            if any(f"{{{name}}}" in a for a in case.args):
                values[name] = str(build(inputs))
        jobs[case.id] = {
            "script": f"launch/{case.entry}.py",
            "args": [a.format(**values) for a in case.args],
            "cwd": str(tmp),
            "stdout": str(tmp / "stdout.txt"),
            "stderr": str(tmp / "stderr.txt"),
        }
    results = {}
    try:
        forked = [c.id for c in selected if not c.fresh]
        if forked:
            jobs_file = tmp_path_factory.mktemp("runner") / "jobs.json"
            jobs_file.write_text(json.dumps([jobs[i] for i in forked]))
            runner = subprocess.run(
                [sys.executable, str(REPO / "tests" / "entry_point_runner.py"), str(jobs_file)],
                capture_output=True,
                text=True,
                timeout=300,
                env=_env(),
            )
            assert runner.returncode == 0, runner.stderr
            status = json.loads(Path(f"{jobs_file}.status").read_text())
            for case_id, code in zip(forked, status, strict=True):
                job = jobs[case_id]
                out, err = (Path(job[k]).read_text() for k in ("stdout", "stderr"))
                results[case_id] = subprocess.CompletedProcess(job["args"], code, out, err)
        for case in (c for c in selected if c.fresh):
            job = jobs[case.id]
            command = [sys.executable, str(REPO / job["script"]), *job["args"]]
            try:
                results[case.id] = subprocess.run(
                    command, capture_output=True, text=True, timeout=120, env=_env(), cwd=job["cwd"]
                )
            except subprocess.TimeoutExpired as e:  # e.g. a server that started instead
                out, err = (b.decode() if b else "" for b in (e.stdout, e.stderr))
                results[case.id] = subprocess.CompletedProcess(command, None, out, err + "timeout")
    finally:
        for inputs in open_inputs:
            for s in inputs.keep:
                s.close()
    return results


def test_cases_are_well_formed():
    assert len({c.id for c in CASES}) == len(CASES)
    for c in CASES:
        assert c.entry in ENTRY_POINTS and c.code in (1, 2), c.id
        names = {a[a.index("{") + 1 : a.index("}")] for a in c.args if "{" in a}
        assert names <= set(INPUTS), (c.id, names - set(INPUTS))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_entry_point(case, outcomes):
    proc = outcomes[case.id]
    prog = ENTRY_POINTS[case.entry][1]
    report = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, report
    assert proc.returncode == case.code, report
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, report
    assert case.message in errors[0], report
    if case.code == 1:  # some files failed: the others were still predicted
        assert "good.png: " in proc.stdout, report
