"""The entry points: `launch/*.py` and the console scripts (capsfast-train, capsfast-predict,
capsfast-visualize, capsfast-app, capsfast-export) all come here, so every one runs inside the
same error boundary (capsfast.errors.run_main). Each imports its module only when called."""

from __future__ import annotations

import importlib

from capsfast.errors import run_main

ENTRY_POINTS = {  # name: (module with main(argv) -> int, the program name in messages)
    "train": ("capsfast.train", "capsfast"),
    "predict": ("capsfast.infer", "predict"),
    "visualize": ("capsfast.figures", "visualize"),
    "app": ("capsfast.app", "app"),
    "export": ("capsfast.portable", "export"),
}


def run(name: str, argv: list[str] | None = None) -> int:
    module, prog = ENTRY_POINTS[name]
    return run_main(lambda args: importlib.import_module(module).main(args), prog, argv)


def train() -> int:
    return run("train")


def predict() -> int:
    return run("predict")


def visualize() -> int:
    return run("visualize")


def app() -> int:
    return run("app")


def export() -> int:
    return run("export")
