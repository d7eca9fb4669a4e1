"""Set-up pieces both LLM stages and the evaluation share: the base LLM with soft tokens, the item
index and the frozen DIN. Plain functions, plain arguments (scoring lives in `training.llm.harness`)."""

from __future__ import annotations

from pathlib import Path

import torch

from data.loading import check_same_data, default_index_dir, recorded_data
from index.build import build_item_index
from rellax import precision
from rellax.device import resolve_device
from rellax.din import DIN
from rellax.item_index import ItemIndex
from rellax.logs import get_logger
from rellax.tokens import add_soft_tokens
from training.llm.data import Catalogue

__all__ = [
    "default_index_dir",
    "load_base_lm",
    "load_din",
    "load_or_build_index",
]

log = get_logger(__name__)


def load_base_lm(model_dir: Path, bf16: bool | None = None, device: str | None = None):  # noqa: ANN201 - (model, tokenizer)
    """The frozen base LLM and its tokenizer, soft tokens added, on `device` (`rellax.device`: auto =
    cuda when torch sees a GPU), in `rellax.precision`'s bf16 recipe where that device has native
    bf16 (`bf16=None`), else fp32: the same recipe the bundle is served in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    bf16 = precision.resolve_dtype(target, None) == torch.bfloat16 if bf16 is None else bf16
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    add_soft_tokens(tokenizer, lm)
    lm.requires_grad_(False)
    lm.to(target)
    precision.cast_for_compute(lm, torch.bfloat16 if bf16 else torch.float32)
    return lm.eval(), tokenizer


def load_or_build_index(
    folder: Path,
    lm,  # noqa: ANN001
    tokenizer,  # noqa: ANN001
    catalogue: Catalogue,
    manifest: dict | None = None,
) -> ItemIndex:
    """The item index from `folder`, built from the base LLM first if it is not there. With the
    samples' `manifest`, the index records its data set, and one built from another is refused."""
    if (folder / "meta.json").exists():
        index = ItemIndex.load(folder)
        if manifest is not None:
            check_same_data("the item index", folder, index.meta.get("data"), manifest)
        return index
    log.info("building item index", folder=str(folder))
    index = build_item_index(lm, tokenizer, list(catalogue.items.values()), domain=catalogue.domain)
    if manifest is not None:
        index.meta["data"] = {k: manifest.get(k) for k in ("source_hash", "dataset", "dataset_key")}
    index.save(folder)
    return index


def load_din(folder: Path, manifest: dict | None = None) -> DIN:
    """The frozen DIN from `rellax train crm`; with the samples' `manifest`, refuses a DIN trained
    on another data set."""
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"no DIN at {folder}: run `rellax train crm` first")
    if manifest is not None:
        check_same_data("the DIN", folder, recorded_data(folder), manifest)
    din = DIN.load(folder).eval()
    din.requires_grad_(False)
    return din


def din_checksum(folder: Path) -> str:
    """Which DIN a folder holds (its weights' SHA-256, 16 hex digits): a DIN retrained on another
    CPU from the same recipe differs in its last digits, so study records name the one they read."""
    from rellax.assets import file_sha256

    return file_sha256(folder / "model.safetensors")[:16]
