"""Data parallelism over a real 2-process gloo group on CPU, launched as users launch it:
k steps with 2 processes at global batch G equal k steps with 1 process at batch G.

(`accelerate.debug_launcher` forks; after torch has run in the pytest process the forked workers
can hang in OpenMP, so the workers here are fresh processes from `accelerate launch`.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capsfast.data import load_mnist, to_float
from capsfast.export import load_model

ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH, TEST = 4, 16, 37  # 37 test images: the two ranks get unequal shards
FLAGS = [
    "--max-steps",
    str(STEPS),
    "--batch-size",
    str(BATCH),
    "--val-size",
    "64",
    "--test-size",
    str(TEST),
    "--report-to",
    "none",
    "--checkpoint-every",
    str(STEPS),
    "--mixed-precision",
    "no",  # fp32 and eager: tests of behaviour pin both (the CPU default is compiled bf16 where it can)
    "--no-compile",
    "--primary-types",  # a small CapsNet (72 primary capsules): ranks agree at any size
    "2",
    "--no-figures",
]


def launch(out, launcher_args):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher_args,
        str(ROOT / "launch" / "train.py"),
        *FLAGS,
        "--output-dir",
        str(out),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_two_ranks_equal_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = launch(one, ["--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = launch(two, ["--config_file", str(ROOT / "launch" / "configs" / "cpu_2proc.yaml")])
    assert r2.returncode == 0, r2.stderr[-3000:]
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert s1["steps"] == s2["steps"] == STEPS

    a = load_file(one / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")
    b = load_file(two / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    assert abs(s2["final_train_loss"] - s1["final_train_loss"]) < 1e-5

    # Evaluation over 2 ranks counts every test image exactly once: the 2-process test
    # accuracy is exactly what one process computes for the same exported model.
    mnist = load_mnist()
    model = load_model(two / "model")
    with torch.no_grad():
        pred = model(to_float(mnist.test_images[:TEST])).lengths.argmax(1)
    expected = (pred == mnist.test_labels[:TEST]).sum().item() / TEST
    assert s2["test_size"] == TEST
    assert s2["test_accuracy"] == expected

    # Only the main process writes: one record per kind (the logged last step and the end-of-run
    # validation), one summary; a second writer would double them.
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["train", "epoch"]
    assert r2.stdout.count("capsfast: test accuracy") == 1


def test_asked_for_two_processes_but_got_one_is_an_error(tmp_path):
    # `accelerate launch --cpu --num_processes 2` silently starts ONE process: refuse to train.
    result = launch(tmp_path, ["--cpu", "--num_processes", "2", "--mixed_precision", "no"])
    assert result.returncode != 0
    assert "world size 1" in result.stderr and "--multi_gpu" in result.stderr
    # (accelerate's launcher prints its own traceback for a failed child; ours has none)
    assert "capsfast: error:" in result.stderr and "capsfast/train.py" not in result.stderr
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("routing", ["triton", "fused"])
def test_triton_routing_under_ddp_matches_the_reference(tmp_path, routing):
    # The custom ops inside a DistributedDataParallel model over 2 gloo ranks (Triton's
    # interpreter on CPU): the same 2 steps as with the torch reference.
    config = ["--config_file", str(ROOT / "launch" / "configs" / "cpu_2proc.yaml")]
    small = [
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--val-size",
        "0",
        "--test-size",
        "2",
        "--checkpoint-every",
        "2",
        "--mixed-precision",
        "no",
        "--no-compile",
        "--primary-types",  # a small CapsNet: the interpreter runs the kernels on 72 capsules
        "2",
        "--no-figures",
    ]
    runs = {}
    for impl in ("torch", routing):
        out = tmp_path / impl
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *config,
            str(ROOT / "launch" / "train.py"),
            *small,
            "--report-to",
            "none",
            "--routing",
            impl,
            "--output-dir",
            str(out),
        ]
        env = {**os.environ, "TRITON_INTERPRET": "1"} if not torch.cuda.is_available() else None
        r = subprocess.run(
            cmd, env=env or os.environ, capture_output=True, text=True, timeout=600, cwd=ROOT
        )
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["routing"] == impl and summary["world_size"] == 2
        runs[impl] = load_file(out / "checkpoints" / "step-00000002" / "model.safetensors")
    for k in runs["torch"]:
        torch.testing.assert_close(runs[routing][k], runs["torch"][k], rtol=1e-4, atol=1e-6, msg=k)
