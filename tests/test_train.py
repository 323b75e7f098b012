"""The trainer end to end on CPU: loss goes down, runs are reproducible, resume is exact,
`accelerate launch` works with and without W&B, bad input gives clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capsfast.checkpoint import list_checkpoints
from capsfast.cli import run as run_entry_point
from capsfast.train import train
from tests.small_runs import small_cfg, synthetic_mnist

ROOT = Path(__file__).resolve().parent.parent


def test_training_on_synthetic_data_reduces_the_loss(tmp_path):
    summary = train(
        small_cfg(tmp_path, max_steps=None, epochs=3, figures=True), data=synthetic_mnist()
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    # A train record at every log_every (2) steps, for the curves of runs shorter than an epoch.
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(2, 3 * 18 + 1, 2))
    assert all(r["images_per_second"] > 0 for r in records if r["kind"] == "train")
    records = epochs
    assert records[-1]["train_loss"] < 0.7 * records[0]["train_loss"]
    assert summary["steps"] == 3 * (288 // 16)
    assert summary["test_accuracy"] > 0.5  # the classes are easy; chance is 0.1
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "curves.png").is_file()


def test_seeded_runs_are_reproducible(tmp_path):
    data = synthetic_mnist()
    a = train(small_cfg(tmp_path / "a", seed=7), data=data)
    b = train(small_cfg(tmp_path / "b", seed=7), data=data)
    train(small_cfg(tmp_path / "c", seed=8), data=data)
    wa = load_file(tmp_path / "a" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model" / "model.safetensors")
    wc = load_file(tmp_path / "c" / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a["final_train_loss"] == b["final_train_loss"]


def test_resume_continues_exactly(tmp_path):
    data = synthetic_mnist()
    full = tmp_path / "full"
    kw = dict(max_steps=8, ema_decay=0.9)  # the EMA must be restored too
    train(small_cfg(full, checkpoint_every=4, keep_checkpoints=5, **kw), data=data)
    ckpts = list_checkpoints(full)
    assert [p.name for p in ckpts] == ["step-00000008", "step-00000004"]
    # A second run that starts from the step-4 checkpoint and runs to step 8.
    part = tmp_path / "part"
    summary = train(small_cfg(part, resume=str(ckpts[1]), **kw), data=data)
    assert summary["steps"] == 8
    a = load_file(ckpts[0] / "model.safetensors")
    b = load_file(list_checkpoints(part)[0] / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ea = load_file(full / "model" / "model.safetensors")  # exported: the EMA weights
    eb = load_file(part / "model" / "model.safetensors")
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=0, msg=k)


def test_ema_weights_are_evaluated_and_exported(tmp_path):
    train(small_cfg(tmp_path, max_steps=6, ema_decay=0.999), data=synthetic_mnist())
    (checkpoint,) = list_checkpoints(tmp_path)
    ema = torch.load(checkpoint / "custom_checkpoint_1.pkl", weights_only=False)  # EMA state
    assert ema["updates"] == 6 and ema["decay"] == 0.999
    exported = load_file(tmp_path / "model" / "model.safetensors")
    raw = load_file(checkpoint / "model.safetensors")  # the trained weights themselves
    for k in exported:
        torch.testing.assert_close(exported[k], ema["module"][k].float(), rtol=0, atol=0, msg=k)
    assert not torch.equal(exported["digit.W"], raw["digit.W"].float())


def test_resume_auto_with_nothing_starts_fresh(tmp_path, capsys):
    summary = train(small_cfg(tmp_path, max_steps=2, resume="auto"), data=synthetic_mnist())
    assert summary["steps"] == 2
    assert "no usable checkpoint" in capsys.readouterr().out


def test_summary_has_every_key_with_its_meaning(tmp_path):
    summary = train(small_cfg(tmp_path, max_steps=12, test_size=40), data=synthetic_mnist())
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in [
        "test_accuracy",
        "test_size",
        "best_val_accuracy",
        "final_train_loss",
        "steps",
        "epochs",
        "world_size",
        "wall_seconds",
        "images_per_second",
        "device",
        "mixed_precision",
        "precision_reason",
        "routing",
        "preset",
        "seed",
        "config",
        "commit",
        "torch",
        "triton",
        "peak_memory_gb",
    ]:
        assert key in summary, key
    assert summary["test_size"] == 40 and summary["steps"] == 12
    assert summary["epochs"] == pytest.approx(12 * 16 / 288)
    assert summary["world_size"] == 1 and summary["device"] == "cpu"
    assert summary["mixed_precision"] == "no" and summary["routing"] == "torch"
    assert 0 < summary["images_per_second"] < 10_000
    assert summary["peak_memory_gb"] is None
    # stopped by --max-steps mid-epoch: the last validation still ran and was recorded
    records = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(records[-1])["step"] == 12


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    code = run_entry_point(
        "train",
        [
            "--data-dir",
            str(tmp_path / "nothing"),
            "--report-to",
            "none",
            "--output-dir",
            str(tmp_path / "out"),
            "--max-steps",
            "1",
        ],
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "does not exist" in err and "--download" in err and "Traceback" not in err


def _launch(args, tmp_path, env_extra=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env_extra or {})}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "launch" / "train.py"),
        "--batch-size",
        "8",
        "--max-steps",
        "3",
        "--val-size",
        "16",
        "--test-size",
        "16",
        "--mixed-precision",
        "no",
        "--no-compile",
        "--output-dir",
        str(tmp_path),
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_accelerate_launch_end_to_end_without_tracking(tmp_path):
    result = _launch(["--report-to", "none"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["test_size"] == 16
    assert not (tmp_path / "wandb").exists()


def test_accelerate_launch_with_wandb_offline(tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_API_KEY": ""}
    result = _launch(["--report-to", "wandb"], tmp_path, env_extra=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path).rglob("*"))[:20]
    assert list(runs[0].glob("*.wandb")), "the offline run holds no data"


def test_real_mnist_run_reaches_95_percent(trained_summary, trained_run):
    # A few hundred steps at batch 32 on real MNIST (the session's shared run, fixtures_model.py).
    assert trained_summary["test_size"] == 1000
    assert trained_summary["steps"] == 400
    assert trained_summary["test_accuracy"] >= 0.95
    assert trained_summary["best_val_accuracy"] >= 0.95
    figures = sorted(p.name for p in (trained_run / "figures").glob("*.png"))
    assert figures == sorted(
        [
            "reconstructions.png",
            "capsule_dimensions.png",
            "confusion_matrix.png",
            "confident_wrong.png",
        ]
    )


def test_explicit_triton_routing_without_a_gpu_is_a_clear_error(tmp_path):
    # Without CUDA and without the Triton interpreter the kernel cannot run: say so, don't train.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if torch.cuda.is_available():
        pytest.skip(
            "CUDA is present: --routing triton runs natively (tested in test_routing_triton)"
        )
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        "--routing",
        "triton",
        "--max-steps",
        "1",
        "--report-to",
        "none",
        "--output-dir",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2
    assert "--routing triton cannot run on cpu" in result.stderr
    assert "TRITON_INTERPRET" in result.stderr and "Traceback" not in result.stderr


def test_two_runs_in_one_process_each_get_their_own_precision(tmp_path):
    # A notebook's second train(): Accelerate's state outlives the first run's Accelerator, and a
    # new precision would be refused with a ValueError (a traceback) if the trainer kept it.
    data = synthetic_mnist(n_train=64, n_test=8)  # bf16 on a CPU is slow: the smallest run
    for precision in ("bf16", "no"):
        cfg = small_cfg(tmp_path / precision, batch_size=4, max_steps=1, val_size=8,
                        eval_batch_size=8, mixed_precision=precision)  # fmt: skip
        assert train(cfg, data=data)["mixed_precision"] == precision


def test_the_cpu_default_precision_follows_the_cpu_and_says_why(tmp_path, capsys):
    # No flag, no launcher setting: bf16 where the CPU has bf16 instructions, else fp32; the
    # banner, config.json and summary.json name the choice and its reason.
    from capsfast.runtime import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    data = synthetic_mnist(n_train=64, n_test=8)
    cfg = small_cfg(tmp_path, batch_size=4, max_steps=1, val_size=8, eval_batch_size=8,
                    mixed_precision=None)  # fmt: skip
    summary = train(cfg, data=data)
    expected = ("bf16", f"the CPU has native bf16 ({native})") if native else (
        "no", "the CPU has no native bf16 (emulated bf16 is several times slower)")  # fmt: skip
    assert (summary["mixed_precision"], summary["precision_reason"]) == expected
    resolved = json.loads((tmp_path / "config.json").read_text())["resolved"]
    assert (resolved["mixed_precision"], resolved["precision_reason"]) == expected
    banner = "bf16 autocast" if native else "fp32"
    assert f"{banner} ({expected[1]})" in capsys.readouterr().out


def test_test_every_epoch_records_the_test_accuracy_of_each_epoch(tmp_path):
    # --test-every-epoch: each epoch record holds the test accuracy (the curve of a record run);
    # without it, none does. The export is still chosen on validation.
    data = synthetic_mnist()
    summary = train(small_cfg(tmp_path / "on", max_steps=None, epochs=2, test_every_epoch=True),
                    data=data)  # fmt: skip
    lines = (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()
    epochs = [r for r in map(json.loads, lines) if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(0 <= r["test_accuracy"] <= 1 for r in epochs)
    assert summary["test_size"] == 64  # the same test set, once more for the exported model
    train(small_cfg(tmp_path / "off", max_steps=None, epochs=1), data=data)
    lines = (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()
    assert not any("test_accuracy" in json.loads(line) for line in lines)


def test_compiled_model_exports_plain_capsnet_keys(tmp_path):
    # Under torch.compile the prepared model is an OptimizedModule; the export must still hold
    # CapsNet's own parameter names so load_model reads it (compilation is lazy: no step needed).
    from capsfast.export import load_model, save_model
    from capsfast.model import ModelConfig
    from capsfast.runtime import make_accelerator
    from capsfast.train import prepare_model

    # The trainer's own Accelerator, after earlier in-process runs without compilation: it must
    # still compile (make_accelerator forgets the process-wide state they left).
    cfg = small_cfg(tmp_path, compile=True)
    acc, _, _, compiled, reason = make_accelerator(cfg)
    assert compiled and acc.state.dynamo_plugin.backend.value.lower() == "inductor"
    assert reason == "--compile"
    prepared, raw, _, _ = prepare_model(ModelConfig(), cfg, acc)
    assert type(prepared).__name__ == "OptimizedModule"
    save_model(raw, tmp_path / "export")
    keys = load_file(tmp_path / "export" / "model.safetensors").keys()
    assert "digit.W" in keys and not any(k.startswith("_orig_mod") for k in keys)
    load_model(tmp_path / "export")


def test_no_figures_skips_the_curves_and_figures_but_nothing_else(tmp_path, capsys):
    summary = train(small_cfg(tmp_path, figures=False), data=synthetic_mnist(n_train=64, n_test=8))
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "model" / "README.md").is_file()
    assert not (tmp_path / "curves.png").exists() and not (tmp_path / "figures").exists()
    assert summary["config"]["figures"] is False
    assert "(--no-figures)" in capsys.readouterr().out
