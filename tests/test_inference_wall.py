"""The inference wall: using a trained model needs no training stack. Importing the inference
modules (each in a fresh interpreter) brings in neither Accelerate, the trainer, W&B nor gradio;
the figure and app modules defer matplotlib and gradio until they draw or serve."""

from __future__ import annotations

import subprocess
import sys

import pytest

TRAINING_ONLY = ("accelerate", "capsfast.train", "wandb", "gradio")


def _imported_after(statement: str, names) -> list[str]:
    code = f"import sys; {statement}; print([m for m in {tuple(names)!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])  # the printed list of module names


@pytest.mark.parametrize("module", ["capsfast.infer", "capsfast.export", "capsfast.model"])
def test_inference_imports_no_training_stack(module):
    assert _imported_after(f"import {module}", TRAINING_ONLY) == []


def test_inference_modules_import_light():
    """infer, figures and app import neither gradio, matplotlib nor wandb until used."""
    statement = "import capsfast, capsfast.infer, capsfast.figures, capsfast.app"
    assert _imported_after(statement, ("gradio", "matplotlib", "wandb")) == []
