"""What machine a result came from: device, driver, versions, and three measured rates (device
copy GB/s, bf16 and fp32 matmul TFLOP/s), as one JSON file.

    python bench/environment.py --out environment.json

The rates are what the machine reaches on the simplest large work (bench/common.py measures
them), so a benchmark's GB/s and TFLOP/s can be read as fractions of them. bench/gpu_check.py
runs this first; bench/report.py renders it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.common

import torch  # noqa: E402

from bench import common  # noqa: E402
from capsfast.provenance import git_commit, package_version, versions  # noqa: E402

NVIDIA_SMI_FIELDS = ("driver_version", "clocks.max.sm", "power.limit", "memory.total")


def nvidia_smi() -> dict:
    """The driver's view (nvidia-smi, when installed): driver version, clocks, power limit."""
    if shutil.which("nvidia-smi") is None:
        return {"nvidia_smi": "not found"}
    query = ["--query-gpu=" + ",".join(NVIDIA_SMI_FIELDS), "--format=csv,noheader"]
    try:
        out = subprocess.run(
            ["nvidia-smi", *query], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return {"nvidia_smi": f"failed: {type(e).__name__}: {e}"}
    first_gpu = out.strip().splitlines()[0]
    return dict(zip(NVIDIA_SMI_FIELDS, (v.strip() for v in first_gpu.split(",")), strict=False))


def describe_device() -> dict:
    if not common.ON_CUDA:
        return {
            "device": common.device_name(),
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        }
    props = torch.cuda.get_device_properties(common.DEVICE)
    return {
        "device": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gb": props.total_memory / 1e9,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        **nvidia_smi(),
    }


def environment() -> dict:
    """Names and versions first (they cannot fail), then the measured rates."""
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        **describe_device(),
        **versions(),
        "pytest_benchmark": package_version("pytest-benchmark"),
        "tiny": common.TINY_TIMED,
    }
    report["copy_gb_per_second"] = common.copy_gb_per_second()
    report["copy_bytes"] = common.COPY_BYTES
    report["matmul_n"] = common.MATMUL_N
    report["bf16_matmul_tflop_per_second"] = common.matmul_tflops(torch.bfloat16)
    report["fp32_matmul_tflop_per_second"] = common.matmul_tflops(torch.float32)
    report["fp32_matmul_precision"] = torch.get_float32_matmul_precision()  # highest: no TF32
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    report = environment()
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for key, value in report.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
