"""Where one compiled training step spends its time: a torch.profiler table of the top kernels
by device time (CPU time on CPU), as text.

    python bench/profile_step.py --out profile.txt [--batch 512] [--dtype bf16] [--routing triton]

The step is the benchmarks' (bench/common.py: the trainer's loss, backward and Adam) on real
MNIST, compiled, after warm-up steps that take the compilation; one step is recorded.
CAPSFAST_BENCH_TINY=1 (gpu_check's dry run) compiles with the aot_eager backend, after one
warm-up step.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.common

from bench.common import (  # noqa: E402  (after TRITON_INTERPRET)
    DEVICE,
    ON_CUDA,
    TINY_TIMED,
    W_INIT_TRAIN,
    new_model,
    run_info,
    sync,
    train_step,
)
from capsfast.data import load_mnist, to_float  # noqa: E402

WARMUP_STEPS = 1 if TINY_TIMED else 3  # compilation, autotuning, CUDA-graph recording
ROWS = 25


def profile_step(batch: int, dtype: str, routing: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    mnist = load_mnist().to(DEVICE)
    x, y = to_float(mnist.train_images[:batch]), mnist.train_labels[:batch]
    model = new_model(routing, W_INIT_TRAIN)
    torch._dynamo.reset()
    backend = "aot_eager" if TINY_TIMED else "inductor"
    net = torch.compile(model, backend=backend, mode=None if TINY_TIMED else "default")
    step = train_step(model, net, dtype)
    for _ in range(WARMUP_STEPS):
        step(x, y)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_CUDA else [])
    with profile(activities=activities) as prof:
        step(x, y)
        sync()
    sort = "self_device_time_total" if ON_CUDA else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=ROWS, max_name_column_width=70)
    info = run_info()
    head = (
        f"one compiled training step ({backend}), batch {batch}, {dtype}, routing {routing}, "
        f"on {info['device']}, torch {info['torch']}, triton {info['triton']}, commit "
        f"{info['commit']}, {info['date']}; top {ROWS} by {sort}"
    )
    return head + "\n\n" + table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the text file to write")
    parser.add_argument("--batch", type=int, default=512, help="images per step")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--routing", default="triton", choices=["torch", "triton", "fused"])
    args = parser.parse_args(argv)
    text = profile_step(args.batch, args.dtype, args.routing)
    Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
