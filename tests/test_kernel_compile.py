"""Every Triton kernel, as the launchers launch it, compiles for sm_90 and sm_80 with the
real GPU compiler (Triton + LLVM + ptxas, no GPU needed) and does not spill registers, under the
installed triton and the oldest one the package supports.

The check itself is bench/compile_kernels.py (one implementation; `python -m
bench.compile_kernels` writes the per-kernel table). Each triton version runs in its own worker
process without TRITON_INTERPRET. The oldest triton comes from $CAPSFAST_TRITON_OLDEST, a
directory made with `pip install --no-deps --target DIR triton==OLDEST_TRITON` (.ci/run does it);
without it the oldest-version tests skip locally and fail in CI.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import version
from pathlib import Path

import pytest

from bench import compile_kernels as ck

ROOT = Path(__file__).resolve().parent.parent
INSTALL_OLDEST = f"pip install --no-deps --target DIR triton=={ck.OLDEST_TRITON}"


@pytest.fixture(scope="module", params=["installed", "oldest"])
def report(request):
    """The worker's report for one triton version (capture + compile; minutes: see README)."""
    if request.param == "installed":
        report = ck.check()
        assert report["triton"] == version("triton")  # the worker's triton is this process's
        return report
    triton_dir = os.environ.get(ck.OLDEST_ENV)
    if not triton_dir:
        reason = f"set {ck.OLDEST_ENV}=DIR after `{INSTALL_OLDEST}`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must check the oldest triton: {reason}")
        pytest.skip(reason)
    if not Path(triton_dir, "triton").is_dir():
        pytest.fail(f"{ck.OLDEST_ENV}={triton_dir} holds no triton package: `{INSTALL_OLDEST}`")
    report = ck.check(triton_dir)
    assert report["triton"] == ck.OLDEST_TRITON, (
        f"{ck.OLDEST_ENV}={triton_dir} gave triton {report['triton']}, not {ck.OLDEST_TRITON}"
    )
    return report


def test_floor_in_pyproject_is_the_oldest_checked():
    """The oldest triton checked here is the floor users get: they cannot drift apart."""
    text = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"triton>=([0-9.]+)', text).group(1)
    assert ck.OLDEST_TRITON.startswith(floor + ".") or ck.OLDEST_TRITON == floor, (floor, text)


def test_worker_ran_this_tree_and_the_gpu_path(report):
    """The worker imported this tree's capsfast, and the launchers of both modules chose the GPU
    geometry (they asked for the SM count)."""
    assert Path(report["capsfast_file"]).resolve().is_relative_to(ROOT)
    assert set(report["sm_queries"]) >= set(ck.KERNEL_MODULES)


def test_every_kernel_was_launched_and_compiled(report):
    """A `*_kernel` that no launcher launches in any case would escape the check: fail on it."""
    assert report["kernels_defined"], "no *_kernel found in the kernel modules"
    never = sorted(set(report["kernels_defined"]) - set(report["kernels_launched"]))
    assert not never, f"never launched: {never}"
    compiled = {(r["kernel"], r["target"]) for r in report["compilations"] if r["ok"]}
    for kernel in report["kernels_defined"]:
        for target in ck.TARGETS:
            assert (kernel, target) in compiled, f"{kernel} has no successful {target} build"


def test_every_case_was_captured(report):
    """Both ops, B = 1 and 512, every dtype mix, bias or not: forward, full backward and
    detach_inner backward each launched kernels."""
    wanted = {
        ck.case_name(*case) + direction
        for case in ck.cases()
        for direction in (" fwd", " bwd", " bwd detach")
    }
    assert {1, 512} <= set(ck.BATCHES)
    assert wanted == set(report["variants"])


def test_no_compile_errors(report):
    failures = [
        f"{r['kernel']} [{r['target']}] ({'; '.join(r['variants'][:3])}):\n{r['error']}"
        for r in report["compilations"]
        if not r["ok"]
    ]
    assert not failures, "\n\n".join(failures)


def test_no_register_spills(report):
    """ptxas -v of every compilation: registers reported, zero bytes of spill stores and loads."""
    for r in report["compilations"]:
        if r["ok"]:
            assert r["registers"] is not None and r["spill_stores"] is not None, r["ptxas_log"]
    spills = [line for line in ck.problems(report) if "spills" in line]
    assert not spills, "\n".join(spills)


# The check's own verdicts, on real ptxas output (triton 3.6, sm_90, the backward pass kernel of
# digit_caps, then named _bwd_pass_kernel, at B=512, bf16 u with fp32 W): cheap, no compile.
PTXAS_SPILLING = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_bwd_pass_kernel' for 'sm_90a'
ptxas info    : Function properties for _bwd_pass_kernel
    16 bytes stack frame, 16 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 16 bytes cumulative stack size
ptxas info    : Compile time = 908.059 ms"""


def test_a_spill_or_an_unlaunched_kernel_is_a_finding():
    figures = ck.parse_ptxas(PTXAS_SPILLING)
    assert figures == dict(
        registers=168, spill_stores=16, spill_loads=16, stack=16, static_smem=None
    )
    build = dict(kernel="m:_bwd_pass_kernel", target="sm_90", ok=True, variants=["v"], num_warps=4)
    report = dict(
        triton="3.6.0",
        kernels_defined=["m:_bwd_pass_kernel", "m:_new_kernel"],
        kernels_launched=["m:_bwd_pass_kernel"],
        compilations=[build | figures],
    )
    found = ck.problems(report)
    assert len(found) == 2
    assert "m:_new_kernel: never launched" in found[0]
    assert "spills 16 B stores / 16 B loads, 168 registers" in found[1]
    clean = ck.parse_ptxas(PTXAS_SPILLING.replace("16 bytes spill", "0 bytes spill"))
    assert not ck.problems(report | dict(compilations=[build | clean], kernels_defined=[]))


def test_occupancy_estimate_matches_the_cuda_occupancy_calculator():
    # 64 registers, 8 warps: 2048 registers per warp, 32 warps fit (50%), 4 blocks.
    assert ck.occupancy(64, 0, 8, "sm_90")["warps_per_sm"] == 32
    # 168 registers round to 5376 per warp: 12 warps fit, 3 blocks of 4 warps.
    assert ck.occupancy(168, 0, 4, "sm_90") == dict(warps_per_sm=12, of=64, limited_by="registers")
    # 255 registers round to 8192 per warp: 8 warps, 2 blocks of 4.
    assert ck.occupancy(255, 0, 4, "sm_80")["warps_per_sm"] == 8
    # 100 KiB of shared memory per block: one block on sm_80 (164 KiB), two on sm_90 (228 KiB).
    assert ck.occupancy(32, 100 * 1024, 4, "sm_80") == dict(
        warps_per_sm=4, of=64, limited_by="shared_memory"
    )
    assert ck.occupancy(32, 100 * 1024, 4, "sm_90")["warps_per_sm"] == 8
