"""`make_tiny_bundle`: a complete bundle in seconds, for the tests of everything downstream of the
bundle format (the service, the backends, LLM-SRec). Offline like every other bundle writer: it
builds its item index with the LLM (`index.build`), so it lives here and not in `rellax/`, which
only reads bundles and writes them (`rellax.bundle_format.write_bundle`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from index.build import build_item_index
from rellax.assets import prepare_tokenizer
from rellax.bundle_format import BundleConfig, write_bundle
from rellax.cflora import inject_cflora
from rellax.din import DIN, DINConfig, DINVocab
from rellax.entities import AGE_BUCKETS, Item
from rellax.llmsrec import LLMSRec, LLMSRecRanker
from rellax.prompt import build_item_prompt
from rellax.sasrec import SASRec, SASRecConfig
from rellax.spa import SPAProjector
from rellax.tokens import add_soft_tokens

__all__ = ["make_tiny_bundle"]


def make_tiny_bundle(
    folder: Path, n_items: int = 120, n_users: int = 40, seed: int = 0, llmsrec: bool = False
) -> Path:
    """A complete bundle over a tiny random Llama (real tokenizer), a random DIN and a synthetic
    catalogue: builds in seconds, for tests of everything downstream of the bundle format. With
    `llmsrec`, a random LLM-SRec (and SASRec) over the same LLM rides along."""
    # Imported at call time: the vLLM parity test swaps `transformers.LlamaConfig` for wider heads.
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(prepare_tokenizer())
    lm = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                    tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    ).eval()  # fmt: skip
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]
    words = ["Night", "River", "Star", "Ghost", "Summer", "City", "Heart", "Storm", "Last", "Blue"]
    items = [
        Item(i, f"The {words[i % 10]} {words[(i // 10) % 10]} {i}", genres[i % 6])
        for i in range(1, n_items + 1)
    ]
    add_soft_tokens(tokenizer, lm)
    # From the base LM, as `rellax index build` does (docs/design.md §4).
    index = build_item_index(lm, tokenizer, items, dim=512, progress=False)
    staging = tempfile.TemporaryDirectory(prefix="rellax-tiny-llmsrec-")
    llmsrec_dir = _tiny_llmsrec(Path(staging.name), lm, tokenizer, items) if llmsrec else None
    config = BundleConfig(k=5)
    inject_cflora(lm, config.r, config.alpha, config.dropout, config.target_modules, config.gate_dim)
    with torch.no_grad():  # a non-trivial adapter and gate, so CFLoRA really changes the scores
        for name, p in lm.named_parameters():
            if ".lora_B." in name or name.endswith("gate.3.weight"):
                p.normal_(0, 0.02)
    vocab = DINVocab.build(range(1, n_users + 1), [i.item_id for i in items], genres, ["male", "female"],
                           AGE_BUCKETS.values(), ["writer", "student", "other"])  # fmt: skip
    din = DIN(DINConfig(**vocab.sizes()), vocab).eval()
    spa = SPAProjector(din.config.embed_dim, lm.config.hidden_size)
    write_bundle(folder, lm=lm, tokenizer=tokenizer, din=din, items=items, item_index=index, config=config,
                 spa=spa, extra={"base_model": {"name": "tiny-random-llama"}},
                 llmsrec=llmsrec_dir)  # fmt: skip
    staging.cleanup()
    return Path(folder)


def _tiny_llmsrec(folder: Path, lm: torch.nn.Module, tokenizer, items: Sequence[Item]) -> Path:  # noqa: ANN001
    """A random LLM-SRec over `lm` (before CFLoRA is injected) and a random SASRec over `items`."""

    with torch.random.fork_rng():  # the rest of the tiny bundle is the same with or without it
        torch.manual_seed(1)
        return _tiny_llmsrec_seeded(folder, lm, tokenizer, items)


def _tiny_llmsrec_seeded(folder: Path, lm: torch.nn.Module, tokenizer, items: Sequence[Item]) -> Path:  # noqa: ANN001
    ids = [it.item_id for it in items]
    sasrec = SASRec(SASRecConfig(len(ids), dim=16), SASRec.item_map(np.array(ids))).eval()
    sasrec.save(folder / "sasrec")
    model = LLMSRec(lm, cf_dim=16, out_dim=32).eval()
    with torch.no_grad():
        prompts = [build_item_prompt(tokenizer, it) for it in items]
        embs = sasrec.item_vectors(torch.tensor(sasrec.rows(ids)))
        vectors = torch.cat([model.item_vectors(prompts[s : s + 64], embs[s : s + 64])
                             for s in range(0, len(prompts), 64)])  # fmt: skip
    LLMSRecRanker.write(folder, model, ids, vectors, folder / "sasrec", k=10)
    return folder
