"""Presets, flags, the learning-rate rule and schedule, and their one-line errors."""

import math
import sys
from pathlib import Path

import pytest

from capsfast.config import PRESETS, TrainConfig, build_parser, parse_args, resolve
from capsfast.runtime import cpp_compiler, resolve_compile, resolve_mixed_precision


def test_paper_preset_is_the_spec():
    cfg = parse_args([])
    assert cfg.preset == "paper"
    assert (cfg.lr, cfg.batch_size, cfg.lr_decay, cfg.lr_decay_every) == (1e-3, 128, 0.96, 2000)
    assert cfg.max_shift == 2 and cfg.routing_iters == 3 and cfg.recon_weight == 0.0005
    assert cfg.schedule == "step" and cfg.ema_decay == 0 and cfg.val_size == 5000


def test_seed_preset_is_the_original_project():
    cfg = parse_args(["--preset", "seed"])
    assert (cfg.lr, cfg.decoder_lr, cfg.weight_decay) == (3e-4, 1e-3, 1e-4)
    assert cfg.batch_size == 128 and cfg.max_shift == 0 and cfg.epochs == 100
    assert cfg.schedule == "constant"


def test_flags_override_the_preset():
    cfg = parse_args(["--preset", "seed", "--lr", "0.01", "--batch-size", "64", "--no-compile"])
    assert cfg.lr == 0.01 and cfg.batch_size == 64 and cfg.compile is False
    assert cfg.weight_decay == 1e-4  # untouched preset value stays


def test_every_field_has_a_flag_with_help():
    parser = build_parser()
    text = parser.format_help()
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    for flag in [
        "--preset",
        "--data-dir",
        "--download",
        "--epochs",
        "--max-steps",
        "--batch-size",
        "--lr",
        "--routing-iters",
        "--routing",
        "--detach-inner",
        "--mixed-precision",
        "--compile",
        "--no-compile",
        "--cpu-threads",
        "--seed",
        "--output-dir",
        "--checkpoint-every",
        "--resume",
        "--report-to",
        "--val-size",
        "--test-size",
    ]:
        assert flag in text
    assert "GLOBAL batch" in text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--max-steps", "0"], "--max-steps must be >= 1"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--routing-iters", "0"], "--routing-iters must be >= 1"),
        (["--val-size", "-5"], "--val-size must be >= 0"),
        (["--preset", "turbo"], "invalid choice: 'turbo'"),
        (["--routing", "cuda"], "invalid choice: 'cuda'"),
        (["--mixed-precision", "fp8"], "invalid choice: 'fp8'"),
        (["--batch-size", "many"], "invalid int value"),
    ],
)
def test_bad_flags_give_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_resolve_rejects_unknown_preset():
    with pytest.raises(ValueError, match="unknown --preset 'x'"):
        resolve({"preset": "x"})


def test_lr_scales_with_sqrt_of_global_batch():
    assert parse_args([]).scaled_lr() == pytest.approx(1e-3)
    assert parse_args(["--batch-size", "512"]).scaled_lr() == pytest.approx(2e-3)
    assert parse_args(["--batch-size", "32"]).scaled_lr() == pytest.approx(5e-4)


def test_step_schedule_decays_every_256k_samples():
    cfg = parse_args([])
    assert cfg.lr_factor(0, 10**6) == 1.0
    assert cfg.lr_factor(1999, 10**6) == 1.0
    assert cfg.lr_factor(2000, 10**6) == pytest.approx(0.96)
    assert cfg.lr_factor(4000, 10**6) == pytest.approx(0.96**2)
    big = parse_args(["--batch-size", "512"])  # 4x the batch: decays every 500 steps
    assert big.lr_factor(499, 10**6) == 1.0 and big.lr_factor(500, 10**6) == pytest.approx(0.96)


@pytest.mark.parametrize("total", [7, 50, 1000, 12345])
def test_onecycle_shape_for_any_budget(total):
    cfg = resolve({"preset": "fast"})
    f = [cfg.lr_factor(s, total) for s in range(total)]
    warm = int(cfg.warmup_frac * total)
    if warm:
        assert f[0] == pytest.approx(1 / warm) and f[warm - 1] == pytest.approx(1.0)
        assert all(a < b for a, b in zip(f[:warm], f[1:warm], strict=False))
    assert max(f) == pytest.approx(1.0)
    assert f[-1] == pytest.approx(cfg.final_lr_frac)
    assert all(a >= b - 1e-12 for a, b in zip(f[warm:], f[warm + 1 :], strict=False))


def test_presets_all_resolve_and_validate():
    for name in PRESETS:
        cfg = resolve({"preset": name})
        assert cfg.preset == name
        assert cfg.validate() is cfg
        assert math.isfinite(cfg.scaled_lr())


def test_mixed_precision_resolution(monkeypatch):
    from capsfast import runtime

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    paper = parse_args([])
    # On a CPU the default follows its instructions: bf16 where it has bf16 units, else fp32.
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: None)
    assert resolve_mixed_precision(paper, on_cuda=False) == (
        "no", "the CPU has no native bf16 (emulated bf16 is several times slower)")  # fmt: skip
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: "avx512_bf16")
    assert resolve_mixed_precision(paper, on_cuda=False) == (
        "bf16", "the CPU has native bf16 (avx512_bf16)")  # fmt: skip
    assert resolve_mixed_precision(paper, on_cuda=True) == ("bf16", "--cuda-precision on CUDA")
    seed = parse_args(["--preset", "seed"])
    assert resolve_mixed_precision(seed, on_cuda=True)[0] == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch` exports
    assert resolve_mixed_precision(paper, on_cuda=True)[0] == "bf16"
    assert resolve_mixed_precision(paper, on_cuda=False)[0] == "bf16"  # "no" there: not set
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # a launcher choice applies
    assert resolve_mixed_precision(paper, on_cuda=True) == (
        "fp16", "the launcher's --mixed_precision")  # fmt: skip
    flagged = parse_args(["--mixed-precision", "no"])  # the flag wins
    assert resolve_mixed_precision(flagged, on_cuda=True) == ("no", "--mixed-precision")
    assert resolve_mixed_precision(flagged, on_cuda=False) == ("no", "--mixed-precision")


def test_native_bf16_is_read_from_the_cpu():
    """The test is torch's CPU-instruction probe (AMX tiles, AVX-512 BF16), not oneDNN's flag,
    which is true on any AVX-512 CPU, emulating or not."""
    import torch

    from capsfast.runtime import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    assert native in (None, "AMX", "avx512_bf16")
    expected = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert (native is not None) == expected
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else None
    if flags is not None and native is not None:  # the kernel reports the instructions too
        assert "avx512_bf16" in flags or "amx_bf16" in flags


@pytest.mark.parametrize("how", ["flag", "launcher"])
def test_fp16_on_a_cpu_is_refused_in_one_line(monkeypatch, tmp_path, how):
    """Accelerate has no fp16 autocast on a CPU: the run would be fp32 under an fp16 label."""
    from capsfast.runtime import SetupError, make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    argv = ["--output-dir", str(tmp_path), "--report-to", "none"]
    if how == "flag":
        argv += ["--mixed-precision", "fp16"]
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(SetupError, match=r"^fp16 on a CPU \(.*\): there is no fp16 autocast"):
        make_accelerator(parse_args(argv))


def test_compile_resolution(monkeypatch):
    """On by default, on CUDA and on a CPU with a C++ compiler; the flag wins, then the
    launcher's backend (its `no` means "not set": `accelerate launch` always exports it)."""
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    cfg = parse_args([])
    assert resolve_compile(cfg, on_cuda=True) == (True, "on CUDA")
    assert resolve_compile(cfg, on_cuda=False) == (True, f"CPU code built with {cpp_compiler()}")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    assert resolve_compile(cfg, on_cuda=False)[0] is True
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    assert resolve_compile(cfg, on_cuda=False) == (True, "the launcher's --dynamo_backend")
    assert resolve_compile(parse_args(["--no-compile"]), on_cuda=True) == (False, "--no-compile")
    assert resolve_compile(parse_args(["--compile"]), on_cuda=False) == (True, "--compile")


def test_a_cpu_without_a_cpp_compiler_runs_eager(monkeypatch, tmp_path):
    """inductor builds its CPU code with a C++ compiler: without one, the default is eager, and
    the reason says what to install. A PATH that holds no compiler is a real such machine."""
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cpp_compiler() is None
    compiled, reason = resolve_compile(parse_args([]), on_cuda=False)
    assert compiled is False and "install g++" in reason
    monkeypatch.setenv("CXX", sys.executable)  # any program on PATH or by path counts as named
    assert cpp_compiler() == sys.executable


def test_a_preset_key_that_is_not_a_setting_is_an_error():
    from capsfast.config import check_presets

    check_presets()  # the shipped presets are clean
    with pytest.raises(ValueError, match=r"preset 'typo' sets unknown settings \['warmup_fracc'\]"):
        check_presets({"typo": {"warmup_fracc": 0.1}})


def test_help_shows_the_chosen_presets_values(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--preset", "fast", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "GLOBAL batch size, summed over all processes (default: 512)" in text
    assert "(default: onecycle)" in text and "(default: 0.999)" in text
    assert "dataclass default" not in text and "(default: None)" not in text
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "summed over all processes (default: 128)" in text


def test_flag_types_come_from_the_dataclass():
    cfg = parse_args(["--lr", "3e-4", "--test-size", "100", "--decoder-lr", "1e-3",
                      "--detach-inner", "--no-compile"])  # fmt: skip
    assert type(cfg.lr) is float and type(cfg.test_size) is int and type(cfg.decoder_lr) is float
    assert cfg.detach_inner is True and cfg.compile is False
    assert parse_args(["--preset", "quick"]).max_steps == 400


def test_quick_preset_is_a_short_paper_run():
    cfg = parse_args(["--preset", "quick"])
    assert (cfg.batch_size, cfg.max_steps, cfg.schedule, cfg.max_shift) == (32, 400, "step", 2)
    assert cfg.scaled_lr() == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "flag", ["--lr", "--decoder-lr", "--weight-decay", "--recon-weight", "--max-seconds",
             "--ema-decay", "--warmup-frac", "--final-lr-frac", "--stop-at-accuracy"]
)  # fmt: skip
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_every_float_flag_must_be_finite_and_the_error_names_it(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([f"{flag}={value}"])
    assert e.value.code == 2
    assert f"{flag} must be a finite number, got {float(value)}" in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_out_of_range_is_one_line(seed, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--seed", seed])
    assert e.value.code == 2 and "--seed must be in [0, 2**32 - 1]" in capsys.readouterr().err
    assert parse_args(["--seed", str(2**32 - 1)]).seed == 2**32 - 1
