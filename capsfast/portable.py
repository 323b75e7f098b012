"""Portable inference graphs of a trained model: ONNX (onnxruntime, any language) and torch.export
(`.pt2`, PyTorch without capsfast), written by `capsfast-export` / `python launch/export.py`.

The graph is the inference forward pass, images [B, C, S, S] in [0, 1] (as
`capsfast.infer.prepare_input` makes them) to:

    CapsNet      lengths [B, K], poses [B, K, D], reconstructions [B, C, S, S] (from the predicted,
                 longest, capsule, as `predict` makes them)
    baseline CNN probabilities [B, K] (the softmax of its logits, as `predict` gives them); it
                 has no decoder, so no poses and no reconstruction

with a dynamic batch dimension. Routing runs through the PyTorch reference (capsfast.routing) with
the model's iteration count unrolled into the graph: the Triton kernels are custom GPU ops that
have no ONNX form (and would tie a .pt2 file to capsfast). Every file is checked against the eager
model before it is kept (`check`): at batch 1 and at a batch above 1, on real MNIST test digits
when the model takes MNIST's input, each output within TOLERANCE.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from capsfast.errors import UserError

FORMATS = ("onnx", "pt2")
TOLERANCE = 1e-4  # largest absolute difference from the eager model, on every output
CHECK_BATCHES = (1, 8)  # batch 1, and a batch above 1: the dynamic dimension at work
EXTRA = "pip install 'capsfast[export]' (or pip install -e '.[export]' in a checkout)"


class InferenceGraph(nn.Module):
    """The model's inference forward pass as plain tensors: what an exported graph computes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.capsules = hasattr(model, "decode")  # CapsNet; the baseline CNN has no decoder

    @property
    def output_names(self) -> list[str]:
        return ["lengths", "poses", "reconstructions"] if self.capsules else ["probabilities"]

    def forward(self, images: torch.Tensor):
        out = self.model(images)  # no labels: the decoder sees the predicted capsule
        if self.capsules:
            return out.lengths, out.poses, out.reconstructions
        return (F.softmax(out.scores, dim=1),)


@contextmanager
def reference_routing(model: nn.Module):
    """Route through the PyTorch reference for the duration (the routing choice is restored):
    export traces it into plain tensor ops; the Triton kernels have no ONNX form."""
    previous = getattr(getattr(model, "digit", None), "requested_routing", None)
    model.set_routing("torch")
    try:
        yield model
    finally:
        if previous is not None:
            model.set_routing(previous)


def example_images(config, batch: int) -> torch.Tensor:
    """`batch` inputs for the model of `config`: real MNIST test digits when the model takes
    MNIST's 1x28x28 input (its test split, never trained on), else seeded uniform noise."""
    if (config.in_channels, config.image_size) == (1, 28):
        from capsfast.data import load_mnist, to_float

        return to_float(load_mnist().test_images[:batch])
    generator = torch.Generator().manual_seed(0)
    shape = (batch, config.in_channels, config.image_size, config.image_size)
    return torch.rand(shape, generator=generator)


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:200] if lines else 'no message'}"


def export_program(graph: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """torch.export of `graph` with a dynamic batch dimension; a graph that cannot be exported
    (data-dependent control flow, an op with no export rule) is a UserError saying why."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        return torch.export.export(graph, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as e:  # torch.export fails in many types; each means "not exportable"
        raise UserError(f"the inference graph cannot be exported ({_one_line(e)})") from None


def require_onnx() -> None:
    """The ONNX exporter needs onnxscript (and onnx), the check onnxruntime: the `export` extra,
    not the core install."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise UserError(f"--format onnx needs {name}, which is not installed: {EXTRA}") from None  # fmt: skip


def write_pt2(program: torch.export.ExportedProgram, path: Path, names: list[str]) -> None:
    torch.export.save(program, str(path))  # the outputs are a tuple in `names`' order


def write_onnx(program: torch.export.ExportedProgram, path: Path, names: list[str]) -> None:
    """ONNX through the current exporter (dynamo), from the already exported program; weights
    inside the one file (capsfast's models are far below ONNX's 2 GB limit). optimize=False:
    onnxscript's optimizer (0.7.2) matches the zero of its `x + 0 -> x` rule with an absolute
    tolerance of 1e-8, so it drops `x + 1e-8`: the eps of squash and of the capsule length (an
    untrained model's lengths then differ by ~1e-4). onnxruntime optimises the graph itself when
    it loads it."""
    try:
        torch.onnx.export(program, dynamo=True, f=str(path), input_names=["images"],
                          output_names=names, external_data=False, verbose=False,
                          optimize=False)  # fmt: skip
    except Exception as e:  # as torch.export: many types, one meaning
        raise UserError(f"the inference graph cannot be exported to ONNX ({_one_line(e)})") from None  # fmt: skip


WRITERS = {"onnx": write_onnx, "pt2": write_pt2}


def run_file(fmt: str, path: Path, images: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the written file on `images`, run as a user runs it: onnxruntime for ONNX,
    torch.export.load(...).module() for pt2."""
    if fmt == "pt2":
        with torch.no_grad():
            return list(torch.export.load(str(path)).module()(images))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {"images": images.numpy()})]


def check(fmt: str, path: Path, graph: InferenceGraph, images: torch.Tensor) -> dict:
    """The file against the eager model at each batch of CHECK_BATCHES: the largest difference
    per output, and whether the predictions agree. Raises UserError beyond TOLERANCE."""
    worst = dict.fromkeys(graph.output_names, 0.0)
    for batch in CHECK_BATCHES:
        x = images[:batch]
        with torch.no_grad():
            expected = graph(x)
        got = run_file(fmt, path, x)
        for name, e, g in zip(graph.output_names, expected, got, strict=True):
            if tuple(g.shape) != tuple(e.shape):
                raise UserError(f"{path}: {name} has shape {tuple(g.shape)} at batch {batch}, "
                                f"PyTorch {tuple(e.shape)}")  # fmt: skip
            worst[name] = max(worst[name], float((g.float() - e.float()).abs().max()))
        if not torch.equal(got[0].argmax(1), expected[0].argmax(1)):
            raise UserError(f"{path}: predicts other classes than PyTorch at batch {batch}")
    bad = {k: v for k, v in worst.items() if v > TOLERANCE}
    if bad:
        raise UserError(f"{path}: differs from PyTorch by more than {TOLERANCE}: {bad}")
    return worst


def export_model(model: nn.Module, fmt: str, path: str | Path) -> dict:
    """Write `model`'s (a CPU model, as load_model gives it) inference graph to `path` as `fmt`
    (onnx or pt2), checked against the eager model before it replaces `path`. Returns the largest
    difference of each output from the eager model."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--output {path} is a directory: give a file name (e.g. model.{fmt})")
    images = example_images(model.config, max(CHECK_BATCHES))
    # Written beside the target and renamed once checked (the suffix: torch.export wants .pt2).
    tmp = path.with_name(f".{path.name}.partial.{fmt}")
    with reference_routing(model.eval()):
        graph = InferenceGraph(model).eval()
        program = export_program(graph, images[:2])  # batch 2: batch 1 would be specialised
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            WRITERS[fmt](program, tmp, graph.output_names)
            worst = check(fmt, tmp, graph, images)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return worst


def main(argv: list[str] | None = None) -> int:
    """`capsfast-export MODEL --format onnx|pt2 --output FILE`."""
    import argparse

    from capsfast.export import load_model, shipped_models

    parser = argparse.ArgumentParser(
        prog="export",
        description="Write a trained model's inference graph as ONNX (onnxruntime) or "
        "torch.export .pt2: images [B, C, S, S] in [0, 1] (prepared as predict prepares them: "
        "capsfast.infer.prepare_input) -> CapsNet: lengths, poses and the reconstruction from "
        "the predicted capsule; the baseline CNN: softmax probabilities (no decoder). The batch "
        "dimension is dynamic. Routing runs through the PyTorch reference with the model's "
        "iteration count fixed in the graph: the Triton kernels have no ONNX form. The file is "
        f"checked against PyTorch at batch {' and '.join(map(str, CHECK_BATCHES))} (every output "
        f"within {TOLERANCE}) before it is written.",
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="exported model directory (model.safetensors + config.json), or the name of a "
        f"shipped model ({', '.join(shipped_models()) or 'none installed'})",
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx or pt2")
    parser.add_argument("--output", required=True, metavar="FILE", help="the file to write")
    args = parser.parse_args(argv)
    if args.format == "onnx":
        require_onnx()  # before loading anything: the missing extra is the first thing to say
    model = load_model(args.model, device="cpu", routing="torch")
    start = time.perf_counter()
    worst = export_model(model, args.format, args.output)
    size = Path(args.output).stat().st_size / 2**20
    differences = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    print(f"export: wrote {args.output} ({args.format}, {size:.1f} MiB) in "
          f"{time.perf_counter() - start:.1f} s; against PyTorch at batch "
          f"{' and '.join(map(str, CHECK_BATCHES))}, largest differences: {differences}",
          file=sys.stdout)  # fmt: skip
    return 0
