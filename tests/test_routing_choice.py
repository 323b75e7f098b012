"""capsfast.routing_choice: the one rule the trainer and inference use to pick the routing
implementation, with its reason. The Triton kernels run here under the interpreter (conftest
sets TRITON_INTERPRET=1 on a CPU); CUDA decisions are checked through the memory rule alone."""

import pytest
import torch

from capsfast.errors import UserError
from capsfast.memory import step_peak_bytes
from capsfast.model import ModelConfig
from capsfast.routing_choice import _first_choice, choose_routing

GIB = 2**30
CPU = torch.device("cpu")


def test_auto_on_a_cpu_is_the_reference_and_says_why(monkeypatch):
    monkeypatch.delenv("CAPSFAST_AUTO_IMPL", raising=False)
    impl, why, note = choose_routing("auto", ModelConfig(), CPU, 128, None)
    assert impl == "torch" and "interpreter" in why and note is None


def test_auto_on_cuda_takes_fused_when_u_hat_would_not_fit(monkeypatch):
    monkeypatch.delenv("CAPSFAST_AUTO_IMPL", raising=False)
    cuda = torch.device("cuda")
    big = ModelConfig(image_size=96)  # I = 51,200: u_hat is 33 MB per sample
    assert step_peak_bytes(big, 128, "triton") > 8 * GIB > step_peak_bytes(big, 128, "fused")
    impl, why, note = _first_choice("auto", big, cuda, 128, 8 * GIB)
    assert impl == "fused" and "free GPU memory" in why
    assert "GiB at batch 128" in note and "never stores it" in note
    assert _first_choice("auto", ModelConfig(), cuda, 128, 8 * GIB)[:2] == (
        "triton",
        "the Triton kernel on CUDA",
    )  # fits: the usual choice
    many = ModelConfig(image_size=96, num_classes=47)  # the fused kernel takes at most 32
    assert _first_choice("auto", many, cuda, 128, GIB)[0] == "triton"
    assert _first_choice("auto", big, CPU, 128, None)[0] == "torch"  # CPU: whatever size


def test_explicit_choices_are_used_or_refused_in_one_line():
    # (--routing triton where Triton cannot run: a fresh process without the interpreter, in
    # tests/test_train.py, since the interpreter is chosen when the kernels are imported)
    assert choose_routing("torch", ModelConfig(), CPU)[:2] == ("torch", "--routing")
    assert choose_routing("triton", ModelConfig(), CPU)[0] == "triton"  # the interpreter runs it
    with pytest.raises(UserError, match=r"^--routing 'cuda': choose one of auto, torch, triton"):
        choose_routing("cuda", ModelConfig(), CPU)
    with pytest.raises(UserError, match=r"^--routing fused takes at most 32 .* routes to 47"):
        choose_routing("fused", ModelConfig(num_classes=47), CPU)


def test_auto_falls_back_to_the_reference_when_another_rank_cannot_run_the_kernel(monkeypatch):
    """Every rank must route alike: one rank's failed probe sends all to the reference."""
    monkeypatch.setenv("CAPSFAST_AUTO_IMPL", "triton")
    impl, why, note = choose_routing(
        "auto", ModelConfig(), CPU, 4, None, all_ranks_ok=lambda ok: True
    )
    assert (impl, why, note) == ("triton", "CAPSFAST_AUTO_IMPL", None)
    impl, why, note = choose_routing(
        "auto", ModelConfig(), CPU, 4, None, all_ranks_ok=lambda ok: False
    )
    assert impl == "torch" and note.startswith("warning: --routing auto cannot use the triton")
    assert "the kernel failed on another rank" in note


def test_a_model_without_routing_takes_the_reference():
    assert choose_routing("triton", None, CPU) == ("torch", "the model has no routing", None)
