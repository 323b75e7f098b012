"""Benchmark set-up (`pytest bench/ --benchmark-only`; CI: `pytest tests bench --benchmark-disable`).

Triton runs natively on CUDA and under its interpreter on CPU; the interpreter must be chosen
before triton is first imported, so it is set here, before any benchmark module loads.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Every results JSON says which code and which device produced it."""
    from bench.common import run_info

    machine_info["capsfast"] = run_info()


@pytest.fixture(scope="session")
def mnist():
    """The MNIST copy shipped with the repo, on the benchmark device (as the trainer keeps it)."""
    from bench.common import DEVICE
    from capsfast.data import load_mnist

    return load_mnist().to(DEVICE)


@pytest.fixture(scope="session")
def matmul_rate():
    """dtype name -> this device's dense matmul TFLOP/s, measured once per session when a timed
    benchmark first asks (a 4096^3 fp32 matmul on CPU, 8192^3 on CUDA; median of blocks), so a
    row's matmul_fraction compares with the same machine under the same load."""
    from bench.common import DTYPES, matmul_tflops

    rates = {}

    def rate(dtype: str) -> float:
        if dtype not in rates:
            rates[dtype] = matmul_tflops(DTYPES[dtype])
        return rates[dtype]

    return rate


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter):
    """The rates of every timed row, so nobody has to open the JSON for them."""
    from bench.common import RESULTS

    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("capsfast rates (median round)")
    width = max(len(name) for name, _ in RESULTS)
    columns = ("images/s", "GB/s", "TFLOP/s", "matmul TFLOP/s", "matmul_fraction")
    tr.write_line(f"{'benchmark':<{width}}  " + "  ".join(f"{c:>15}" for c in columns))
    for name, info in RESULTS:
        cells = (
            _cell(info.get("images_per_second"), ",.1f"),
            _cell(info.get("gb_per_second"), ".3g"),
            _cell(info.get("tflop_per_second"), ".3g"),
            _cell(info.get("matmul_tflop_per_second"), ".3g"),
            _cell(info.get("matmul_fraction"), ".3f"),
        )
        tr.write_line(f"{name:<{width}}  " + "  ".join(f"{c:>15}" for c in cells))
