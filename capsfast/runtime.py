"""Run set-up: the device, precision, compile mode and world size that a training run uses,
resolved once from the flags, the launcher's environment and the machine (the routing
implementation: capsfast.routing_choice).

Each choice has one rule (the flag wins; then the launcher; then the preset on CUDA; then what
suits a CPU), and each is stated in words in the run's banner.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
from datetime import timedelta

import torch

from capsfast.config import TrainConfig
from capsfast.errors import UserError

PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}


class SetupError(UserError):
    """A launch or flag combination that cannot run; the message says what to change."""


def use_cuda() -> bool:
    """CUDA when there is a GPU, unless the launcher asked for the CPU (ACCELERATE_USE_CPU)."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return torch.cuda.is_available() and not use_cpu


def cpu_has_native_bf16() -> str | None:
    """The CPU's bf16 instructions by name (AMX tiles, AVX-512 BF16), or None where bf16 is
    emulated. oneDNN's own flag is true on any AVX-512 CPU, emulating or not, so it is not the
    test."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512_bf16"
    return None


def resolve_mixed_precision(cfg: TrainConfig, on_cuda: bool) -> tuple[str, str]:
    """(precision, why): the flag, else the launcher's setting (`accelerate launch` exports `no`
    when nothing was asked, so `no` there means "not set"), else --cuda-precision on CUDA, else
    on a CPU bf16 where the CPU has bf16 instructions (1.42x the fp32 step measured on one with
    avx512_bf16) and fp32 where bf16 is emulated (6-13x slower on an AVX2 CPU)."""
    if cfg.mixed_precision is not None:
        return cfg.mixed_precision, "--mixed-precision"
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher != "no":
        return launcher, "the launcher's --mixed_precision"
    if on_cuda:
        return cfg.cuda_precision, "--cuda-precision on CUDA"
    native = cpu_has_native_bf16()
    if native:
        return "bf16", f"the CPU has native bf16 ({native})"
    return "no", "the CPU has no native bf16 (emulated bf16 is several times slower)"


def cpp_compiler() -> str | None:
    """The C++ compiler that inductor's CPU code would be built with, or None without one."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def resolve_compile(cfg: TrainConfig, on_cuda: bool) -> tuple[bool, str]:
    """(compile, why): the flag, else the launcher's dynamo backend (`accelerate launch` exports
    `no` when nothing was asked, so `no` there means "not set"), else on: on CUDA, and on a CPU
    with a C++ compiler, where inductor's code made the whole training step 1.66x faster at bf16
    and 1.30x at fp32 (batch 128, 2 cores, bench/cpu_breakdown.py) for about 14 s of compiling,
    repaid within the first 40 steps."""
    if cfg.compile is not None:
        return cfg.compile, "--compile" if cfg.compile else "--no-compile"
    if os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower() not in ("no", ""):
        return True, "the launcher's --dynamo_backend"
    if on_cuda:
        return True, "on CUDA"
    compiler = cpp_compiler()
    if compiler:
        return True, f"CPU code built with {compiler}"
    return False, "no C++ compiler for inductor's CPU code (install g++ to compile)"


def check_world_size(world: int) -> None:
    """Refuse a launch that asked for several processes but runs alone: every copy would train
    the whole model on its own, N times the work for one result."""
    if world != 1:
        return
    env = os.environ
    if "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        # `accelerate launch --cpu --num_processes N` sets a rendezvous address, then starts one.
        raise SetupError(
            "the launcher set up a process group (MASTER_ADDR) but this run has world size 1. "
            "On CPU launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            "--num_processes N ...` (`--cpu --num_processes N` starts only one process)"
        )
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if tasks > 1 and "WORLD_SIZE" not in env:
        raise SetupError(
            f"srun started {tasks} tasks but each has world size 1 and would train a full copy: "
            "start one `accelerate launch` per node (see launch/slurm/train.sbatch)"
        )


def make_accelerator(cfg: TrainConfig):
    """(accelerator, mixed_precision, why that precision, compile, why compile) for this run; sets CPU
    threads on CPU. fp16 on a CPU is refused: Accelerate has no CPU fp16 autocast and would run
    fp32 while the run said fp16."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin

    from capsfast import tracking

    on_cuda = use_cuda()
    mixed_precision, precision_reason = resolve_mixed_precision(cfg, on_cuda)
    if mixed_precision == "fp16" and not on_cuda:
        raise SetupError(
            f"fp16 on a CPU ({precision_reason}): there is no fp16 autocast on a CPU and the run "
            "would be fp32 under an fp16 label; use --mixed-precision bf16 or no"
        )
    compile_, compile_reason = resolve_compile(cfg, on_cuda)
    # AcceleratorState is a process-wide singleton fixed by the first Accelerator: a second
    # train() in one process (a notebook, a test) would fail on a new precision and silently keep
    # the old compile setting. Forget it; keep PartialState (the device and the process group).
    AcceleratorState._reset_state(reset_partial_state=False)
    timeout = timedelta(seconds=cfg.peer_timeout)
    if "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ:
        from capsfast.distributed import init_restarted_group

        init_restarted_group(timeout, "nccl" if on_cuda else "gloo")  # after an elastic restart
    accelerator = Accelerator(
        cpu=not on_cuda,
        mixed_precision=mixed_precision,
        log_with="wandb" if tracking.wandb_wanted(cfg.report_to) else None,
        project_dir=cfg.output_dir,
        dynamo_plugin=TorchDynamoPlugin(
            backend="inductor" if compile_ else "no", mode=cfg.compile_mode
        ),
        # Several processes: a peer that hangs (or a node that vanished) stops the others after
        # --peer-timeout with one line (capsfast.distributed), not torch's 30 minutes.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
    )
    check_world_size(accelerator.num_processes)
    if accelerator.device.type == "cpu":
        # `accelerate launch` sets OMP_NUM_THREADS=1 unless told: 1.5x slower on 2 cores.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 1) // local))
        if mixed_precision == "bf16" and cpu_has_native_bf16() is None:
            accelerator.print(
                "capsfast: warning: bf16 on a CPU without bf16 instructions is emulated: 6-13x "
                "slower than fp32 where measured (an AVX2 CPU); pass --mixed-precision no for speed"
            )
    return accelerator, mixed_precision, precision_reason, compile_, compile_reason


def any_rank(accelerator, flag) -> bool:
    """Whether `flag` (a bool or a device tensor) holds on any process: one collective, so that
    all ranks decide alike; no collective with one process."""
    flag = torch.as_tensor(flag, device=accelerator.device).float()
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    return flag.item() > 0


def describe_device(accelerator) -> str:
    """`cpu (2 threads)` or the GPU's name, in words, for the banner and summary."""
    device = accelerator.device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def under_single_process_launcher() -> bool:
    """Started by `accelerate launch` with one process (its simple launcher: a parent that waits
    for this process and turns any non-zero exit code into a traceback of its own)."""
    env = os.environ
    return "ACCELERATE_MIXED_PRECISION" in env and "LOCAL_RANK" not in env


def take_terminal_from_launcher() -> None:
    """Under a single-process `accelerate launch` in a terminal, Ctrl-C reaches the launcher as
    well as the trainer, and the launcher dies with a KeyboardInterrupt traceback while the
    trainer is still saving its checkpoint. So the trainer moves into a process group of its own
    in the terminal's foreground: Ctrl-C reaches it alone, the launcher keeps waiting, and the
    terminal goes back to the launcher's group when the trainer exits (if the trainer is killed
    outright, the shell takes the terminal back when the launcher exits)."""
    if not under_single_process_launcher() or not os.isatty(0):
        return
    try:
        launcher_group = os.getpgrp()
        if os.tcgetpgrp(0) != launcher_group or os.getpgid(os.getppid()) != launcher_group:
            return  # a background job, or not the launcher's group: leave the terminal alone
        os.setpgid(0, 0)
        _foreground(os.getpgrp())
    except OSError:
        return
    atexit.register(_foreground, launcher_group)


def _foreground(group: int) -> None:
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a background group may ask too
    try:
        os.tcsetpgrp(0, group)
    except OSError:
        pass
    finally:
        signal.signal(signal.SIGTTOU, previous)
