"""Peak memory and step time of training against input size and class count, per routing
implementation (torch, triton, fused): where each runs out of memory at a fixed batch, and the
largest batch each fits. The u_hat tensor [B, I, J, D] that torch and triton store grows with the
image area (I) times the classes (J); the fused DigitCaps never stores it.

Three kinds of figures, never mixed up:
  analytic       capsfast.memory's model (fp32): peak bytes of a step at BATCH, and the largest
                 batch within BUDGET_GIB; for every case, on any machine
  measured, CPU  peak RSS (resource.getrusage ru_maxrss) of one forward + backward in a fresh
                 subprocess (after one at batch 1 that allocates the gradients), at two batch
                 sizes: the slope is the per-sample peak, set against the analytic per-sample bytes (tracemalloc does not see torch's allocations). Triton
                 runs on CPU only under its interpreter, which copies every tensor argument of a
                 launch: its RSS overstates triton and fused a little, never understates them
  measured, CUDA torch.cuda.max_memory_allocated of one step at BATCH; out of memory is recorded
                 as such

`pytest bench/test_memory.py --benchmark-only` times one training step per case (size 28, 36,
64, 96 px x 10, 100 classes x torch, triton, fused; pytest-benchmark) with the analytic figures,
and on CUDA the measured peak, in extra_info; on CPU it times the torch reference where the step
fits in CPU_MEMORY_CAP_GIB (shared machines) and skips the Triton paths (interpreter time), as
the rest of bench/ does. With --benchmark-disable (CI) each path runs once at a tiny size, and the
analytic model is checked against the tensors autograd really saves.

`python -m bench.test_memory` writes the analytic matrix and the measured CPU peaks to
bench/results/cpu/memory_<date>_<commit>.json and the plot bench/results/memory.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest
import torch

from bench.common import DEVICE, ON_CUDA, ROOT, describe, finish, run_info, timed
from capsfast.memory import (
    common_activation_bytes,
    fused_supports,
    kept_routing_bytes,
    largest_batch,
    parameter_count,
    per_sample_bytes,
    step_peak_bytes,
)
from capsfast.model import CapsNet, ModelConfig

SIZES = (28, 36, 64, 96)
CLASSES = (10, 100)
IMPLS = ("torch", "triton", "fused")
BATCH = 128  # the paper's batch: "runs out of memory at a fixed batch"
BUDGET_GIB = float(os.environ.get("CAPSFAST_MEMORY_BUDGET_GIB", 12))  # analytic only
CPU_BATCH = 8
CPU_MEMORY_CAP_GIB = 3.0  # never allocate more than this on a shared CPU machine
ROUNDS = {"rounds": 5, "warmup_rounds": 1} if ON_CUDA else {"rounds": 2, "warmup_rounds": 1}
GIB = 2**30
# Measured on CPU by the script: (impl, size, classes) and the two batch sizes of the slope.
# The batches are large enough that the activations, not the parameters' gradients, make the
# peak at both (else the slope reads another phase of the step), and small enough to stay within
# CPU_MEMORY_CAP_GIB; the interpreter's cases are the smallest that finish in minutes.
RSS_CASES = [
    ("torch", 28, 10, (16, 48)),
    ("torch", 36, 10, (16, 48)),
    ("torch", 64, 10, (8, 24)),
    ("torch", 28, 100, (8, 24)),
    ("torch", 36, 100, (4, 12)),
    ("torch", 28, 10, (4, 12)),  # the interpreter cases' batches, for a like-for-like row
    ("triton", 28, 10, (4, 12)),
    ("fused", 28, 10, (4, 12)),
]


def config(size: int, classes: int) -> ModelConfig:
    return ModelConfig(image_size=size, num_classes=classes)


def analytic(size: int, classes: int, impl: str, batch: int = BATCH) -> dict:
    cfg = config(size, classes)
    peak = step_peak_bytes(cfg, batch, impl)
    return {
        "size": size, "classes": classes, "impl": impl, "input_capsules": cfg.num_primary,
        "parameters": parameter_count(cfg), "per_sample_bytes": per_sample_bytes(cfg, impl),
        "u_hat_bytes_per_sample": 4 * cfg.num_primary * cfg.routed_capsules * cfg.digit_dim,
        "batch": batch, "peak_bytes": peak, "budget_gib": BUDGET_GIB,
        "fits_budget": peak <= BUDGET_GIB * GIB,
        "largest_batch_in_budget": largest_batch(cfg, impl, BUDGET_GIB * GIB),
        "kernel_supports": impl != "fused" or fused_supports(cfg),
    }  # fmt: skip


# --------------------------------------------------------------------------- pytest-benchmark
def _step(model, batch: int):
    from capsfast.model import compute_loss

    cfg = model.config
    x = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=DEVICE)
    y = torch.arange(batch, device=DEVICE) % cfg.num_classes
    optimizer = torch.optim.Adam(model.parameters())

    def step():
        _, loss, _, _ = compute_loss(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("size", SIZES)
def test_step_memory(benchmark, size, classes, impl):
    info = analytic(size, classes, impl)
    if benchmark.disabled:  # CI: each path once, tiny (20 px: a 2x2 primary grid; 3 classes)
        if (size, classes) != (SIZES[0], CLASSES[0]):
            pytest.skip("benchmarking disabled: the first size and class count test each path")
        cfg, batch = ModelConfig(image_size=20, num_classes=3), 2
    else:
        cfg, batch = config(size, classes), BATCH if ON_CUDA else CPU_BATCH
        if not info["kernel_supports"]:
            pytest.skip(f"the fused kernel takes J <= 32 capsules, this model routes to {classes}")
        if not ON_CUDA:
            if impl != "torch":
                pytest.skip(
                    "Triton runs on CPU only under its interpreter: its time measures Python"
                )
            if step_peak_bytes(cfg, batch, impl) > CPU_MEMORY_CAP_GIB * GIB:
                pytest.skip(f"needs more than {CPU_MEMORY_CAP_GIB} GiB: too much for a shared CPU")
    if impl != "torch":
        from bench.common import need_triton

        need_triton(impl)
    torch.manual_seed(0)
    model = CapsNet(cfg, routing=impl).to(DEVICE)
    describe(benchmark, group=f"memory {size}px {classes} classes", subject="train_step memory",
             impl=impl, dtype="fp32", batch=batch, baseline=impl == "torch",
             **{f"analytic_{k}": v for k, v in info.items()})  # fmt: skip
    step = _step(model, batch)
    try:
        loss = timed(benchmark, step, **ROUNDS)
    except torch.OutOfMemoryError:
        benchmark.extra_info["out_of_memory"] = True
        pytest.skip(f"out of memory at batch {batch} (recorded)")
    finish(benchmark, images=batch)
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------- the model, in CI
def _saved_bytes(model, x, y) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward,
    parameters excluded."""
    from capsfast.model import compute_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compute_loss(model, x, y)
    return sum(seen.values())


@pytest.mark.parametrize("impl", IMPLS)
def test_kept_bytes_are_what_autograd_saves(impl):
    """The analytic model's kept bytes (A + kept(impl)) against the tensors autograd saves, at a
    small size (exactly the model's terms, within 2% for the small tensors it leaves out)."""
    if impl != "torch":
        from bench.common import need_triton

        need_triton(impl)
    cfg = ModelConfig(image_size=24, num_classes=5)  # I = 288
    model = CapsNet(cfg, routing=impl).to(DEVICE)
    B = 2
    x = torch.rand(B, 1, 24, 24, device=DEVICE)
    y = torch.arange(B, device=DEVICE) % 5
    want = B * (common_activation_bytes(cfg) + kept_routing_bytes(cfg, impl))
    assert _saved_bytes(model, x, y) == pytest.approx(want, rel=0.02)


def test_fused_runs_where_the_others_do_not():
    """Analytically: at batch 128 and 96 px, torch and triton exceed a 12 GiB budget and fused
    fits; at every size fused needs the least and fits the largest batch."""
    for size in SIZES:
        for classes in CLASSES:
            rows = {impl: analytic(size, classes, impl) for impl in IMPLS}
            peaks = [rows[impl]["peak_bytes"] for impl in IMPLS]
            assert peaks[0] > peaks[1] > peaks[2], (size, classes)
            batches = [rows[impl]["largest_batch_in_budget"] for impl in IMPLS]
            assert batches[0] <= batches[1] <= batches[2]
    big = {impl: step_peak_bytes(config(96, 10), BATCH, impl) for impl in IMPLS}
    assert big["torch"] > big["triton"] > 12 * GIB > big["fused"]


# --------------------------------------------------------------------------- measured on CPU
def _rss_child(impl: str, size: int, classes: int, batch: int) -> dict:
    """In a fresh process: one forward + backward at batch 1, which allocates the gradients
    (they stay, and accumulate in place), then one at `batch`: its peak is then always that of
    the activations on top of parameters and gradients, at any batch (Adam's state does not
    depend on the batch). ru_maxrss (KiB on Linux) before and after the second."""
    import resource

    from capsfast.model import compute_loss

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = CapsNet(config(size, classes), routing=impl)
    for b in (1, batch):
        x = torch.rand(b, 1, size, size)
        y = torch.arange(b) % classes
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _, loss, _, _ = compute_loss(model, x, y)
        loss.backward()
        del x, y
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"before_kib": before, "peak_kib": after, "loss": float(loss)}


def measure_rss(impl: str, size: int, classes: int, batches=(4, 12)) -> dict:
    """Per-sample peak bytes from two fresh processes: (peak(b2) - peak(b1)) / (b2 - b1)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    if impl != "torch":
        env["TRITON_INTERPRET"] = "1"
    runs = []
    for batch in batches:
        args = [sys.executable, "-m", "bench.test_memory", "--rss-child", impl, str(size),
                str(classes), str(batch)]  # fmt: skip
        out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-2000:]}")
        runs.append({"batch": batch, **json.loads(out.stdout.strip().splitlines()[-1])})
    (b1, r1), (b2, r2) = ((r["batch"], r["peak_kib"]) for r in runs)
    per_sample = (r2 - r1) * 1024 / (b2 - b1)
    model = per_sample_bytes(config(size, classes), impl)
    return {"impl": impl, "size": size, "classes": classes, "runs": runs,
            "measured_per_sample_bytes": per_sample, "analytic_per_sample_bytes": model,
            "measured_over_analytic": per_sample / model}  # fmt: skip


def plot(matrix: list[dict], measured: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    colours = {"torch": "tab:red", "triton": "tab:orange", "fused": "tab:green"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    for impl in IMPLS:
        for classes, style in zip(CLASSES, ("-", "--"), strict=True):
            rows = [r for r in matrix if r["impl"] == impl and r["classes"] == classes]
            label = f"{impl}, {classes} classes"
            if impl == "fused" and classes > 32:
                label += " (kernel: J <= 32; analytic only)"
            ax.plot([r["size"] for r in rows], [r["peak_bytes"] / GIB for r in rows], style,
                    marker="o", color=colours[impl], label=label)  # fmt: skip
            bx.plot([r["size"] for r in rows], [r["per_sample_bytes"] / 2**20 for r in rows],
                    style, color=colours[impl], alpha=0.6)  # fmt: skip
    for m in measured:
        bx.plot(m["size"], m["measured_per_sample_bytes"] / 2**20, "x" if m["classes"] == 10
                else "+", color=colours[m["impl"]], markersize=10, mew=2)  # fmt: skip
    ax.axhline(BUDGET_GIB, color="black", lw=1)
    ax.text(SIZES[0], BUDGET_GIB * 1.1, f"a {BUDGET_GIB:g} GiB budget", fontsize=8)
    for a in (ax, bx):
        a.set_yscale("log")
        a.set_xlabel("image side (px)")
        a.set_xticks(SIZES)
        a.grid(alpha=0.3)
    ax.set_ylabel("GiB")
    ax.set_title(f"analytic peak of one fp32 training step, batch {BATCH}")
    ax.legend(fontsize=7)
    bx.set_ylabel("MiB per sample")
    bx.set_title("per sample: analytic (lines), CPU RSS (x: 10, +: 100 classes)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rss-child", nargs=4, metavar=("IMPL", "SIZE", "CLASSES", "BATCH"))
    parser.add_argument("--no-measure", action="store_true", help="the analytic matrix only")
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/cpu/...)")
    parser.add_argument("--plot", default=str(ROOT / "bench" / "results" / "memory.png"))
    parser.add_argument("--replot", metavar="JSON", help="only redraw the plot from a results file")
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            record = json.load(f)
        plot(record["analytic"], record["measured_cpu_rss"], args.plot)
        return 0
    if args.rss_child:
        impl, size, classes, batch = args.rss_child
        print(json.dumps(_rss_child(impl, int(size), int(classes), int(batch))))
        return 0
    matrix = [analytic(s, k, i) for s in SIZES for k in CLASSES for i in IMPLS]
    measured = []
    if not args.no_measure:
        for impl, size, classes, batches in RSS_CASES:
            print(f"measuring {impl} {size}px {classes} classes at batches {batches}", flush=True)
            measured.append(measure_rss(impl, size, classes, batches))
            print(json.dumps({k: v for k, v in measured[-1].items() if k != "runs"}), flush=True)
    info = run_info()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = args.out or ROOT / "bench" / "results" / "cpu" / f"memory_{stamp}_{info['commit']}.json"
    record = {"machine": info, "command": " ".join(["python -m bench.test_memory", *sys.argv[1:]]),
              "budget_gib": BUDGET_GIB, "batch": BATCH, "analytic": matrix,
              "measured_cpu_rss": measured}  # fmt: skip
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    plot(matrix, measured, args.plot)
    print(f"wrote {out} and {args.plot}")
    return 0


if __name__ == "__main__":
    if DEVICE.type == "cpu" and "--rss-child" not in sys.argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
