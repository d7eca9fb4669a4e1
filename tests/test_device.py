"""`RELLAX_DEVICE`: where offline work runs; a bad value fails at once, naming the setting."""

from __future__ import annotations

import pytest
import torch

from rellax.device import resolve_device


def test_auto_is_cuda_when_torch_sees_a_gpu_else_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELLAX_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    monkeypatch.setenv("RELLAX_DEVICE", "AUTO")
    assert resolve_device().type == expected


def test_the_argument_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELLAX_DEVICE", "cuda:7")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("RELLAX_DEVICE", " cpu ")
    assert resolve_device() == torch.device("cpu")


@pytest.mark.parametrize("value", ["gpu0", "meta", "mps"])
def test_unknown_devices_name_the_setting(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("RELLAX_DEVICE", value)
    with pytest.raises(ValueError, match="RELLAX_DEVICE"):
        resolve_device()


def test_a_gpu_that_is_not_there_fails_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    monkeypatch.setenv("RELLAX_DEVICE", f"cuda:{count}")  # one past the last GPU (cuda:0 on a CPU box)
    with pytest.raises(ValueError, match="RELLAX_DEVICE"):
        resolve_device()


def test_the_base_lm_loads_on_the_resolved_device(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from training.llm.setup import load_base_lm

    monkeypatch.setenv("RELLAX_DEVICE", "cpu")
    lm, _ = load_base_lm(tiny_model_dir, bf16=True)
    assert {p.device.type for p in lm.parameters()} == {"cpu"}
    from rellax import precision

    assert precision.compute_dtype(lm) == torch.bfloat16  # the recipe: bf16 decoder linears
    assert lm.model.embed_tokens.weight.dtype == lm.model.norm.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in lm.parameters())  # the base stays frozen
