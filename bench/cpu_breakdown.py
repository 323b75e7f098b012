"""Where the CPU training step's time goes, against this machine's matmul rate, in one run.

    python bench/cpu_breakdown.py [--batch 128] [--out bench/results/cpu/breakdown_<date>_<commit>.json]

Times, in one process and interleaved (so load shifts every row alike): a 4096^3 fp32 matmul
(the rate every fraction divides by), the two convolutions forward and forward+backward as the
step runs them (Conv1's input needs no gradient; PrimaryCaps' does), PrimaryCaps in channels_last
memory format, and the whole optimiser step (bench/common.py's train_step: the trainer's loss,
backward and Adam), also with PrimaryCaps' input in channels_last (the one memory-format change a
model could make; its weights stay contiguous, as safetensors and the optimiser want them). Each row: median seconds, GFLOP (2 per multiply-add), GFLOP/s and the
fraction of the matmul rate. fp32, the torch routing, eager (the trainer's CPU step where bf16 is
emulated); then the options for the rest of the step, each a whole step: bf16 autocast (the
trainer's CPU default where the CPU has bf16 instructions), Adam's fused kernel, torch.compile,
torch.compile with bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.common

from bench.common import FLOP_TRAIN, W_INIT_TRAIN, new_model, run_info, train_step  # noqa: E402
from capsfast.data import load_mnist, to_float  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MATMUL_N = 4096


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN primitive creation, allocator
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--no-compile", action="store_true", help="leave out the torch.compile rows (~1 min)"
    )
    args = parser.parse_args(argv)
    B = args.batch
    torch.manual_seed(0)

    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    x1 = torch.rand(B, 1, 28, 28)
    w1 = (torch.randn(256, 1, 9, 9) * 0.1).requires_grad_()
    x2 = torch.randn(B, 256, 20, 20, requires_grad=True)
    w2 = (torch.randn(256, 256, 9, 9) * 0.01).requires_grad_()
    x2_cl = x2.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    w2_cl = w2.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    g1, g2 = torch.randn(B, 256, 20, 20), torch.randn(B, 256, 6, 6)
    mnist = load_mnist()
    x, y = to_float(mnist.train_images[:B]), mnist.train_labels[:B]
    model = new_model("torch", W_INIT_TRAIN)
    step = train_step(model, model, "fp32")
    model_cl = new_model("torch", W_INIT_TRAIN)  # the same weights (new_model seeds)
    model_cl.primary.register_forward_pre_hook(
        lambda _, args: (args[0].contiguous(memory_format=torch.channels_last),)
    )
    step_cl = train_step(model_cl, model_cl, "fp32")
    # The options for the 46% of the step that is not PrimaryCaps (issue: the CPU step against
    # the peers): bf16 autocast where the CPU has bf16 instructions, Adam's fused CPU kernel, and
    # torch.compile of the whole model (its compilation is not timed: the first call).
    model_bf16 = new_model("torch", W_INIT_TRAIN)
    step_bf16 = train_step(model_bf16, model_bf16, "bf16")
    model_fused = new_model("torch", W_INIT_TRAIN)
    step_fused = train_step(model_fused, model_fused, "fp32", fused_adam=True)
    compiled = {}
    for dtype in () if args.no_compile else ("fp32", "bf16"):
        torch._dynamo.reset()
        m = new_model("torch", W_INIT_TRAIN)
        compiled[dtype] = train_step(m, torch.compile(m), dtype)
        t = time.perf_counter()
        compiled[dtype](x, y)  # compiles
        print(f"compiled the {dtype} step in {time.perf_counter() - t:.0f} s", flush=True)

    def conv1_fwd():
        with torch.no_grad():
            F.conv2d(x1, w1)

    def conv1_train():  # the step's Conv1: ReLU, and a weight gradient only
        F.relu(F.conv2d(x1, w1)).backward(g1)

    def primary_fwd():
        with torch.no_grad():
            F.conv2d(x2, w2, stride=2)

    def primary_train():
        F.conv2d(x2, w2, stride=2).backward(g2)

    def primary_train_cl():
        F.conv2d(x2_cl, w2_cl, stride=2).backward(g2.contiguous(memory_format=torch.channels_last))

    conv1_macs = B * 256 * 20 * 20 * 81
    primary_macs = B * 256 * 6 * 6 * 256 * 81
    rows = {  # name: (fn, GFLOP)
        "matmul 4096^3": (lambda: a @ b, 2 * MATMUL_N**3 / 1e9),
        "conv1 forward": (conv1_fwd, 2 * conv1_macs / 1e9),
        "conv1 forward+backward (weight grad)": (conv1_train, 4 * conv1_macs / 1e9),
        "primarycaps forward": (primary_fwd, 2 * primary_macs / 1e9),
        "primarycaps forward+backward": (primary_train, 6 * primary_macs / 1e9),
        "primarycaps forward+backward, channels_last": (primary_train_cl, 6 * primary_macs / 1e9),
        "train step (whole model, Adam)": (lambda: step(x, y), FLOP_TRAIN * B / 1e9),
        "train step, PrimaryCaps input channels_last": (
            lambda: step_cl(x, y),
            FLOP_TRAIN * B / 1e9,
        ),
        "train step, bf16 autocast": (lambda: step_bf16(x, y), FLOP_TRAIN * B / 1e9),
        "train step, fused Adam": (lambda: step_fused(x, y), FLOP_TRAIN * B / 1e9),
    }
    for dtype, step_c in compiled.items():
        name = "train step, torch.compile" + (" + bf16" if dtype == "bf16" else "")
        rows[name] = (lambda step_c=step_c: step_c(x, y), FLOP_TRAIN * B / 1e9)
    times = {name: [] for name in rows}
    for _ in range(args.repeats):  # interleaved: each round times every row once
        for name, (fn, _) in rows.items():
            times[name].append(median_seconds(fn, 1))
    rate = rows["matmul 4096^3"][1] / statistics.median(times["matmul 4096^3"])
    results = []
    for name, (_, gflop) in rows.items():
        median = statistics.median(times[name])
        results.append(dict(name=name, median_s=median, gflop=gflop, gflop_per_s=gflop / median,
                            matmul_fraction=gflop / median / rate))  # fmt: skip
    info = run_info()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    report = dict(batch=B, repeats=args.repeats, load_average=load, matmul_gflop_per_s=rate,
                  command="python bench/cpu_breakdown.py " + " ".join(argv or sys.argv[1:]),
                  **info, rows=results)  # fmt: skip
    print(f"{info['device']}, fp32, batch {B}, commit {info['commit']}, load {' '.join(load)}")
    print(f"{'row':<46} {'median s':>9} {'GFLOP':>8} {'GFLOP/s':>8} {'of matmul':>9}")
    for r in results:
        print(f"{r['name']:<46} {r['median_s']:>9.3f} {r['gflop']:>8.1f} {r['gflop_per_s']:>8.1f} "
              f"{r['matmul_fraction']:>9.2f}")  # fmt: skip
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = args.out or ROOT / "bench/results/cpu" / f"breakdown_{stamp}_{info['commit']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
