"""Compile every Triton kernel of capsfast with the real GPU compiler, on a machine without a GPU.

The kernels have only run under the Triton interpreter on CPU, which accepts programs the GPU
compiler rejects. This module proves what the real toolchain can prove without a GPU: each kernel,
specialised exactly as the launchers launch it, goes through Triton's frontend, LLVM and
ptxas for sm_90 (H100) and sm_80 (A100), and ptxas -v says its registers, spills and stack.

    python -m bench.compile_kernels [--oldest DIR]   # both triton versions -> bench/results/compile/

How (worker processes without TRITON_INTERPRET: one per triton version and target):
  1. capture: the launchers (kernels/routing.py: route_forward, route_backward; kernels/
     digit_caps.py: digit_caps_forward, digit_caps_backward) run on fake CUDA tensors
     (FakeTensorMode: shapes, dtypes and strides, no memory) with every `*_kernel` of both
     modules replaced by a recorder that keeps the grid, the arguments and the launch options of
     each launch. The SM count answers 132 (an H100) and CUDA device guards are no-ops, so the
     launchers take their real GPU code path and tiles.
  2. compile: each recorded launch is replayed through Triton's own launch path,
     `JITFunction.warmup` (argument binding, int/pointer specialisation, options, cache), with
     Triton's driver replaced by one that only names the target: Triton compiles, and loads
     and launches nothing. A tensor argument is replayed as a pointer at a 512-byte aligned
     base (what the CUDA caching allocator hands out) plus the view's byte offset, so alignment
     specialisation matches a real launch. Identical compilations (same kernel, signature, constexprs, options
     and target: Triton's own kernel hash) are compiled once and list every variant that needs
     them. ptxas -v output (TRITON_DUMP_PTXAS_LOG) gives registers, spills and stack.

Why a worker process: under TRITON_INTERPRET=1 (set by the test suites' conftest) the `@triton.jit`
objects and every helper they call are InterpretedFunctions: the GPU code generator rejects them
("Unsupported function referenced"), and the launchers pick interpreter tile sizes from them. A
process started without it imports the same modules, and takes the same code path, as a GPU
user. The oldest supported triton needs its own process anyway (PYTHONPATH=DIR, a
`pip install --no-deps --target DIR triton==OLDEST_TRITON`).

tests/test_kernel_compile.py runs this check (fails on a compile error, a spill, or a `*_kernel`
never launched); the script writes the per-kernel table with an occupancy estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "compile"
OLDEST_TRITON = "3.6.0"  # the floor in pyproject.toml; the GPU machine runs it
OLDEST_ENV = "CAPSFAST_TRITON_OLDEST"  # a --target DIR holding triton==OLDEST_TRITON (CI sets it)

KERNEL_MODULES = ("capsfast.kernels.routing", "capsfast.kernels.digit_caps")
H100_SMS = 132
TARGETS = {"sm_90": ("cuda", 90, 32), "sm_80": ("cuda", 80, 32)}

# The paper's DigitCaps: I = 1152 primary capsules, J = 10 classes, D = 16, Din = 8, 3 iterations.
PAPER = dict(I=1152, J=10, D=16, Din=8, T=3)
BATCHES = (1, 512)  # 1: B specialised to a constant (and BLOCK_B = 1); 512: a full batch
# (activations u / u_hat, parameters W / bias): one dtype each, and the AMP mix (fp32 parameters).
DTYPES = (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32"), ("fp16", "fp32"))

# Per-SM limits for the occupancy estimate (CUDA C Programming Guide, compute capabilities table).
SM_LIMITS = {
    "sm_90": dict(regs=65536, smem=228 * 1024, smem_per_block=227 * 1024, warps=64, blocks=32),
    "sm_80": dict(regs=65536, smem=164 * 1024, smem_per_block=163 * 1024, warps=64, blocks=32),
}
SMEM_RESERVED_PER_BLOCK = 1024  # the driver reserves 1 KiB of shared memory per block (sm_80+)


# ----------------------------------------------------------------------------------------------
# Capture: run the launchers on fake CUDA tensors, record each kernel launch
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    kernel: str  # module:name
    variant: str  # which op, shape, dtypes, direction asked for it
    grid: tuple
    args: tuple  # tensors already replaced by _Pointer
    kwargs: dict  # constexprs passed by name and launch options (num_warps, num_stages)


class _Pointer:
    """What a tensor argument tells Triton's launcher: its dtype and its address. The base is
    aligned as the CUDA caching allocator aligns blocks (512 bytes); the offset is the view's."""

    BASE = 1 << 40

    def __init__(self, tensor):
        self.dtype = tensor.dtype
        self.byte_offset = tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self.BASE + self.byte_offset

    def __repr__(self):
        return f"<{self.dtype} at base+{self.byte_offset}>"


@dataclasses.dataclass
class _Capture:
    launches: list = dataclasses.field(default_factory=list)
    variant: str = ""  # the case and direction now running: stamped on each launch


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` is recorded, not run.
    Not an InterpretedFunction, so the launchers' interpreter check says "GPU"."""

    def __init__(self, name: str, capture: _Capture):
        self.name, self.capture = name, capture

    def __getitem__(self, grid):
        import torch

        def launch(*args, **kwargs):
            if callable(grid):
                raise NotImplementedError(f"{self.name}: a callable grid is not captured yet")
            pointer = lambda x: _Pointer(x) if isinstance(x, torch.Tensor) else x  # noqa: E731
            self.capture.launches.append(
                Launch(
                    kernel=self.name,
                    variant=self.capture.variant,
                    grid=tuple(int(g) for g in grid),
                    args=tuple(pointer(a) for a in args),
                    kwargs={k: pointer(v) for k, v in kwargs.items()},
                )
            )

        return launch


def jit_kernels(module) -> dict:
    """The module's `*_kernel` attributes: every one must be a plain @triton.jit kernel."""
    from triton.runtime.jit import JITFunction

    kernels = {n: k for n, k in vars(module).items() if n.endswith("_kernel")}
    for name, kernel in kernels.items():
        if type(kernel) is not JITFunction:
            raise TypeError(
                f"{module.__name__}.{name} is a {type(kernel).__name__}, not a JITFunction: run "
                "without TRITON_INTERPRET (an autotuned or heuristic kernel needs support here)"
            )
    return kernels


@contextlib.contextmanager
def _as_h100(modules, sm_queries: list):
    """The launchers' GPU queries answer for an H100 without a GPU: the SM count (kernels/
    common.py's `sm_count`, under each name it is imported by) is 132, and CUDA device guards
    (torch.cuda.device) switch nothing. Appends to sm_queries the module that asked for the SM
    count (the calling module, whichever name it used): proof that the launchers chose the GPU
    geometry."""
    import torch

    common = importlib.import_module("capsfast.kernels.common")
    users = [m for m in (common, *modules) if vars(m).get("sm_count") is common.sm_count]
    saved = [(m, "sm_count", common.sm_count) for m in users]
    saved += [(torch.cuda, n, getattr(torch.cuda, n)) for n in _DEVICE_EXCHANGE]

    def h100_sm_count(device) -> int:
        # Who asked: the calling launcher's module (they call it as common.sm_count).
        sm_queries.append(sys._getframe(1).f_globals["__name__"])
        return H100_SMS

    try:
        for module in users:
            module.sm_count = h100_sm_count
        for name in _DEVICE_EXCHANGE:
            setattr(torch.cuda, name, lambda index: index)  # the one device stays current
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


_DEVICE_EXCHANGE = ("_exchange_device", "_maybe_exchange_device")  # what torch.cuda.device calls


@contextlib.contextmanager
def _recording(modules, capture: _Capture):
    saved = [(m, n, k) for m in modules for n, k in jit_kernels(m).items()]
    try:
        for module, name, _ in saved:
            setattr(module, name, _Recorder(f"{module.__name__}:{name}", capture))
        yield
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def cases():
    """(op, B, activation dtype, parameter dtype, bias): every combination the check covers.
    Routing without bias has no parameter tensor: one case per activation dtype."""
    for op in ("routing", "digit_caps"):
        for B in BATCHES:
            for act, par in DTYPES:
                for bias in (False, True):
                    if op == "routing" and not bias and act != par:
                        continue
                    yield op, B, act, par, bias


def case_name(op: str, B: int, act: str, par: str, bias: bool) -> str:
    params = f" {par} bias" if bias else (f" W {par}" if op == "digit_caps" else "")
    return f"{op} B={B} {act}{params}"


def capture() -> dict:
    """Run forward and backward (full and detach_inner) of both ops for every case on fake CUDA
    tensors; returns the launches and what the launchers asked of the GPU."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    modules = [importlib.import_module(m) for m in KERNEL_MODULES]
    routing, digit_caps = modules
    dtypes = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)
    I, J, D, Din, T = (PAPER[k] for k in ("I", "J", "D", "Din", "T"))
    log, sm_queries = _Capture(), []
    with _as_h100(modules, sm_queries), _recording(modules, log), FakeTensorMode():
        for op, B, act, par, with_bias in cases():
            a, p = dtypes[act], dtypes[par]
            bias = torch.empty((J, D), dtype=p, device="cuda") if with_bias else None
            name = case_name(op, B, act, par, with_bias)
            if op == "routing":
                u_hat = torch.empty((B, I, J, D), dtype=a, device="cuda")
                log.variant = f"{name} fwd"
                v, S, Vprev = routing.route_forward(u_hat, bias, T)
                for detach in (False, True):
                    log.variant = f"{name} bwd" + (" detach" if detach else "")
                    routing.route_backward(torch.empty_like(v), u_hat, S, Vprev, detach)
            else:
                u = torch.empty((B, I, Din), dtype=a, device="cuda")
                W = torch.empty((I, J, D, Din), dtype=p, device="cuda")
                log.variant = f"{name} fwd"
                v, S, Vprev = digit_caps.digit_caps_forward(u, W, bias, T)
                for detach in (False, True):
                    log.variant = f"{name} bwd" + (" detach" if detach else "")
                    digit_caps.digit_caps_backward(
                        torch.empty_like(v), u, W, bias, S, Vprev, T, detach
                    )
    defined = sorted(f"{m.__name__}:{n}" for m in modules for n in jit_kernels(m))
    return dict(launches=log.launches, kernels_defined=defined, sm_queries=sorted(set(sm_queries)))


# ----------------------------------------------------------------------------------------------
# Compile: replay each launch through JITFunction.warmup for a GPU target
# ----------------------------------------------------------------------------------------------


class _CompileOnlyDriver:
    """Takes the place of Triton's CUDA driver during warmup: names the target and nothing else
    (warmup compiles; it never loads a module or launches, which would need the driver)."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"compile-only:{self.target.arch}"  # JITFunction keeps one cache per device

    def get_current_stream(self, device=None):
        return 0


_PTXAS = dict(
    registers=r"Used (\d+) registers",
    spill_stores=r"(\d+) bytes spill stores",
    spill_loads=r"(\d+) bytes spill loads",
    stack=r"(\d+) bytes stack frame",
    static_smem=r"(\d+) bytes smem",
)


def parse_ptxas(log: str) -> dict:
    """ptxas -v figures of the (single) entry function in `log`; None where a line is absent."""
    out = {}
    for key, pattern in _PTXAS.items():
        m = re.search(pattern, log)
        out[key] = int(m.group(1)) if m else None
    return out


def occupancy(registers: int, smem: int, num_warps: int, sm: str) -> dict:
    """Resident warps per SM (an estimate, the CUDA occupancy calculator's rules): registers are
    allocated per warp in units of 256, shared memory per block plus 1 KiB reserved."""
    lim = SM_LIMITS[sm]
    by = dict(warps=lim["warps"] // num_warps, blocks=lim["blocks"])
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by["registers"] = (lim["regs"] // regs_per_warp) // num_warps
    if smem > lim["smem_per_block"]:
        by["shared_memory"] = 0
    elif smem:
        by["shared_memory"] = lim["smem"] // (smem + SMEM_RESERVED_PER_BLOCK)
    blocks = min(by.values())
    limiter = min(by, key=by.get)
    return dict(warps_per_sm=blocks * num_warps, of=lim["warps"], limited_by=limiter)


def _jsonable(x):
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return str(x)


def compile_launches(launches: list, targets=TARGETS) -> list:
    """Compile every distinct launch for every target; one record per distinct compilation."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    kernels = {}
    for name in {launch.kernel for launch in launches}:
        module, attr = name.split(":")
        kernels[name] = getattr(importlib.import_module(module), attr)
    records, failed = {}, {}
    previous = driver._active  # None unless a real driver was made (reset_active needs a GPU)
    for sm, target in targets.items():
        driver.set_active(_CompileOnlyDriver(GPUTarget(*target)))
        try:
            for launch in launches:
                fn = kernels[launch.kernel]
                same_call = (launch.kernel, sm, repr(launch.args), repr(launch.kwargs))
                if same_call in failed:  # a failure is not cached by Triton: do not retry it
                    failed[same_call]["variants"].add(launch.variant)
                    continue
                log = io.StringIO()
                start = time.perf_counter()
                try:
                    with contextlib.redirect_stdout(log):
                        compiled = fn.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
                except Exception as e:  # noqa: BLE001  (every compiler error is a finding)
                    message = f"{type(e).__name__}: {e}".strip().splitlines()
                    failed[same_call] = dict(
                        kernel=launch.kernel, target=sm, error="\n".join(message[:40]),
                        variants={launch.variant}, grid=launch.grid,
                    )  # fmt: skip
                    continue
                seconds = time.perf_counter() - start
                key = (compiled.hash, sm)
                if key not in records:
                    md = compiled.metadata
                    src = compiled.src
                    names = fn.arg_names
                    ptxas = parse_ptxas(log.getvalue())
                    records[key] = dict(
                        kernel=launch.kernel,
                        target=sm,
                        ok=True,
                        hash=compiled.hash,
                        signature=dict(src.signature),
                        constexprs={names[k[0]]: _jsonable(v) for k, v in src.constants.items()},
                        divisible_by_16=[names[k[0]] for k in src.attrs],
                        num_warps=md.num_warps,
                        num_stages=md.num_stages,
                        shared=md.shared,
                        **ptxas,
                        ptxas_log=log.getvalue().strip(),
                        compile_seconds=round(seconds, 2),
                        variants=set(),
                        grids=set(),
                    )
                records[key]["variants"].add(launch.variant)
                records[key]["grids"].add(launch.grid)
        finally:
            driver.set_active(previous)
    out = list(records.values()) + [dict(r, ok=False) for r in failed.values()]
    for r in out:
        r["variants"] = sorted(r["variants"])
        if "grids" in r:
            r["grids"] = sorted(r["grids"])
        if r["ok"] and r["registers"] is not None:
            smem = r["shared"] + (r["static_smem"] or 0)
            r["occupancy"] = occupancy(r["registers"], smem, r["num_warps"], r["target"])
    return sorted(out, key=lambda r: (r["kernel"], r["target"], r["variants"][0]))


def worker(target: str) -> dict:
    """Capture and compile for one target in this process (which must not run the interpreter)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_kernels: the worker must run without TRITON_INTERPRET")
    import triton

    import capsfast

    start = time.perf_counter()
    captured = capture()
    capture_seconds = time.perf_counter() - start
    records = compile_launches(captured["launches"], {target: TARGETS[target]})
    return dict(
        triton=triton.__version__,
        triton_file=triton.__file__,
        capsfast_file=capsfast.__file__,
        kernels_defined=captured["kernels_defined"],
        kernels_launched=sorted({launch.kernel for launch in captured["launches"]}),
        sm_queries=captured["sm_queries"],
        variants=sorted({launch.variant for launch in captured["launches"]}),
        launches=len(captured["launches"]),
        capture_seconds=round(capture_seconds, 2),
        compile_seconds={target: round(time.perf_counter() - start - capture_seconds, 2)},
        compilations=records,
    )


def check(triton_dir: str | None = None, timeout: float = 1800) -> dict:
    """Capture and compile for every target with the installed triton or (triton_dir) the one
    installed by `pip install --no-deps --target triton_dir`; returns the merged report.

    One worker process per target, run at the same time (the two targets take about as long;
    on 2 cores that halves the wall time). The workers' environment: no TRITON_* or CAPSFAST_*
    settings of the caller (the check is of the default launches, compiled by default), a fresh
    Triton cache (a cache hit would skip ptxas and its log), this tree first on the path (its
    own capsfast and kernels) after triton_dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "CAPSFAST_"))}
    path = ([triton_dir] if triton_dir else []) + [str(ROOT), env.get("PYTHONPATH", "")]
    with tempfile.TemporaryDirectory(prefix="capsfast-compile-") as tmp:
        env.update(PYTHONPATH=os.pathsep.join(p for p in path if p), TRITON_DUMP_PTXAS_LOG="1")
        running = {}
        for target in TARGETS:
            out = Path(tmp) / f"{target}.json"
            cmd = [sys.executable, "-m", "bench.compile_kernels", "--worker", str(out), target]
            cache = dict(TRITON_CACHE_DIR=str(Path(tmp) / f"cache-{target}"))
            log = open(Path(tmp) / f"{target}.log", "w+")  # closed below
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env | cache, stdout=log, stderr=log)
            running[target] = (proc, out, log)
        reports = []
        try:
            for target, (proc, out, log) in running.items():
                code = proc.wait(timeout=timeout)
                log.seek(0)
                if code != 0:
                    raise RuntimeError(
                        f"compile_kernels worker for {target} failed (exit {code}):\n"
                        + log.read()[-6000:]
                    )
                reports.append(json.loads(out.read_text()))
        finally:
            for proc, _, log in running.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
    merged = dict(reports[0], compilations=[], compile_seconds={})
    for report in reports:
        for key in ("triton", "kernels_defined", "kernels_launched", "variants", "launches"):
            assert report[key] == merged[key], (key, report[key], merged[key])
        merged["compilations"] += report["compilations"]
        merged["compile_seconds"] |= report["compile_seconds"]
        merged["capture_seconds"] = max(merged["capture_seconds"], report["capture_seconds"])
    return merged


# ----------------------------------------------------------------------------------------------
# The table (script)
# ----------------------------------------------------------------------------------------------


def problems(report: dict) -> list[str]:
    """Every finding of one report, one line each: compile failures, spills, missing ptxas
    figures, `*_kernel`s never launched."""
    found = []
    for name in sorted(set(report["kernels_defined"]) - set(report["kernels_launched"])):
        found.append(f"{name}: never launched by the launchers in any case, so never compiled")
    for r in report["compilations"]:
        where = f"{r['kernel']} [{r['target']}, triton {report['triton']}] ({r['variants'][0]}"
        where += f" and {len(r['variants']) - 1} more)" if len(r["variants"]) > 1 else ")"
        if not r["ok"]:
            found.append(f"{where}: compile failed: {r['error'].splitlines()[0]}")
        elif r["registers"] is None or r["spill_stores"] is None:
            found.append(f"{where}: no ptxas -v figures in the compile log")
        elif r["spill_stores"] or r["spill_loads"]:
            const = ", ".join(f"{k}={v}" for k, v in r.get("constexprs", {}).items())
            found.append(
                f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads, "
                f"{r['registers']} registers, {r['stack']} B stack, {r['num_warps']} warps"
                + (f"; {const}" if const else "")
            )
    return found


def _short(kernel: str) -> str:
    module, name = kernel.split(":")
    return f"{module.rsplit('.', 1)[-1]}.{name}"


def _variant_summary(variants: list[str]) -> str:
    if len(variants) <= 3:
        return "; ".join(variants)
    return f"{'; '.join(variants[:2])}; ... ({len(variants)} variants)"


def _span(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def summary_rows(report: dict) -> list[dict]:
    """Per kernel and target: compilations, registers, spill bytes, stack, warps/SM (ranges)."""
    rows = {}
    for r in report["compilations"]:
        row = rows.setdefault((r["kernel"], r["target"]), dict(builds=[], failed=0))
        row["builds" if r["ok"] else "failed"] += [r] if r["ok"] else 1
    out = []
    for (kernel, target), row in sorted(rows.items()):
        ok = row["builds"]
        out.append(
            dict(
                kernel=_short(kernel),
                target=target,
                compilations=len(ok),
                failed=row["failed"],
                registers=_span(r["registers"] for r in ok),
                spills=_span(max(r["spill_stores"] or 0, r["spill_loads"] or 0) for r in ok),
                spilling=sum(bool(r["spill_stores"] or r["spill_loads"]) for r in ok),
                stack=_span(r["stack"] for r in ok),
                num_warps=_span(r["num_warps"] for r in ok),
                warps_per_sm=_span((r.get("occupancy") or {}).get("warps_per_sm") for r in ok),
            )
        )
    return out


def markdown(reports: list[dict], command: str, commit: str, machine: dict) -> str:
    lines = [
        "# Triton kernels compiled for GPU targets (no GPU: Triton frontend + LLVM + ptxas)",
        "",
        f"Regenerate: `{command}` (commit {commit}). Paper shape I={PAPER['I']}, J={PAPER['J']}, "
        f"D={PAPER['D']}, Din={PAPER['Din']}, T={PAPER['T']}; B in {list(BATCHES)}; dtypes "
        "(activations, parameters) "
        + ", ".join(f"{a}/{p}" for a, p in DTYPES)
        + f"; launches captured from the launchers with an H100's {H100_SMS} SMs. Registers, "
        "spills and stack from ptxas -v; shared = Triton's dynamic shared memory + ptxas static; "
        "warps/SM is an occupancy estimate (registers in 256-per-warp units, shared memory + 1 "
        "KiB per block, at most 64 warps and 32 blocks per SM), not a measurement. Compile "
        "times are wall seconds on the machine that ran it: "
        + ", ".join(f"{k} {v}" for k, v in machine.items())
        + ".",
        "",
        "## Summary",
        "",
        "| triton | kernel | target | compilations | failed | regs | spilling builds | spill B "
        "| stack B | warps | warps/SM |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        for row in summary_rows(report):
            lines.append(
                f"| {report['triton']} | {row['kernel']} | {row['target']} | "
                f"{row['compilations']} | {row['failed']} | {row['registers']} | "
                f"{row['spilling']} | {row['spills']} | {row['stack']} | {row['num_warps']} | "
                f"{row['warps_per_sm']} |"
            )
    lines.append("")
    for report in reports:
        found = problems(report)
        lines += [
            f"## triton {report['triton']}",
            "",
            f"{len(report['compilations'])} distinct compilations from {report['launches']} "
            f"launches ({len(report['variants'])} variants); capture {report['capture_seconds']} "
            f"s; compile, one process per target at the same time: "
            + ", ".join(f"{t} {s} s" for t, s in report["compile_seconds"].items())
            + ". Findings: "
            + (f"{len(found)}" if found else "none (no compile error, no spill)."),
            "",
        ]
        lines += [f"- {f}" for f in found] + ([""] if found else [])
        lines += [
            "| kernel | target | pointers | constexprs | regs | spill st/ld B | stack B "
            "| shared B | warps | warps/SM (limit) | variants |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["compilations"]:
            if not r["ok"]:
                lines.append(
                    f"| {_short(r['kernel'])} | {r['target']} | | | FAILED: "
                    f"{r['error'].splitlines()[0][:80]} | | | | | | {_variant_summary(r['variants'])} |"
                )
                continue
            pointers = " ".join(t[1:] for t in r["signature"].values() if t.startswith("*"))
            const = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
            occ = r.get("occupancy") or {}
            lines.append(
                f"| {_short(r['kernel'])} | {r['target']} | {pointers} | {const} | "
                f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['stack']} | "
                f"{r['shared'] + (r['static_smem'] or 0)} | {r['num_warps']} | "
                f"{occ.get('warps_per_sm')} ({occ.get('limited_by')}) | "
                f"{_variant_summary(r['variants'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("OUT", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--oldest",
        metavar="DIR",
        default=os.environ.get(OLDEST_ENV),
        help=f"a directory holding triton=={OLDEST_TRITON} (pip install --no-deps --target DIR "
        f"triton=={OLDEST_TRITON}); default ${OLDEST_ENV}",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="default: %(default)s")
    args = parser.parse_args(argv)
    if args.worker:
        out, target = args.worker
        Path(out).write_text(json.dumps(worker(target), indent=1, default=_jsonable))
        return 0
    if not args.oldest:
        parser.error(
            f"--oldest DIR (or ${OLDEST_ENV}) is required: pip install --no-deps --target DIR "
            f"triton=={OLDEST_TRITON}"
        )
    from capsfast.provenance import git_commit, versions

    reports = [check(), check(args.oldest)]
    command = f"python -m bench.compile_kernels --oldest DIR  # DIR: triton=={OLDEST_TRITON}"
    args.out.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    machine = dict(
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        platform=platform.platform(),
        cpus=os.cpu_count(),
        **{k: v for k, v in versions().items() if k != "triton"},  # each report names its own
    )
    # The committed table names files by their place in the tree or the package, not this machine.
    for report in reports:
        report["capsfast_file"] = str(Path(report["capsfast_file"]).resolve().relative_to(ROOT))
        report.pop("triton_file")  # the version names it
    (args.out / "kernels.json").write_text(
        json.dumps(dict(command=command, commit=commit, machine=machine, reports=reports), indent=1)
        + "\n"
    )
    (args.out / "kernels.md").write_text(markdown(reports, command, commit, machine))
    for report in reports:
        for line in problems(report):
            print(line)
    print(f"wrote {args.out / 'kernels.json'} and {args.out / 'kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
