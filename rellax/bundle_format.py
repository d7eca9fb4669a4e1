"""The bundle format: everything the service needs to score, in one directory, checksummed.

This module owns the files (writing, verifying, the config they carry); `rellax.bundle.Bundle` is
the runtime that loads them.

Layout (tensors in safetensors, nothing pickled):

    manifest.json          format version, model version, config, base model, data hashes, metrics,
                           library versions, created time, and the sha256 of every file below
    tokenizer/             the LLM tokenizer with the two soft tokens added
    base/                  the base LLM (Hugging Face dir, vocabulary resized for the soft tokens)
    adapters.safetensors   CFLoRA A, B and gate weights, by module name
    spa.safetensors        the SPA projector (when SPA is on)
    din/                   the frozen DIN (weights, config, vocab)
    items.json             the catalogue: id, title, category (first genre), and the data's own id
                           ("key") where it is not the integer id
    domain.json            the data set's prompt wording (`rellax.domain.Domain`; absent: MovieLens)
    index/                 item vectors and the hnswlib index (SUBR)
    merged/                optional: W0 + s·B·Ḡᵀ·A as a plain HF dir for vLLM (docs/design.md §8)
    llmsrec/               optional: LLM-SRec's small modules, the catalogue's item vectors, their
                           hnswlib index and the SASRec teacher (`rellax.llmsrec.LLMSRecRanker`); it
                           reads the base LLM above with the adapters off

`verify` checks every checksum before anything is read (a mismatch names the file).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rellax.assets import file_sha256
from rellax.cflora import merge_cflora_state_dict
from rellax.din import DIN
from rellax.domain import MOVIES, Domain
from rellax.entities import Item
from rellax.errors import BundleError
from rellax.features import Mode
from rellax.item_index import ItemIndex
from rellax.llmsrec import LLMSRecRanker
from rellax.spa import SPAProjector
from rellax.tokens import add_soft_tokens, answer_token_ids

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST",
    "BundleConfig",
    "adapter_state_dict",
    "base_state_dict",
    "verify",
    "write_bundle",
    "write_merged",
]

BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BundleConfig:
    """How the bundle's model was built and is meant to be run."""

    k: int = 15
    mode: Mode = "subr"
    spa: bool = True
    gated: bool = True
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    gate_dim: int = 256
    # The data set's rating scale (MovieLens: whole stars 1-5; label data: 1 or 5); the service
    # rejects events off it.
    rating_min: float = 1.0
    rating_max: float = 5.0
    rating_step: float = 1.0

    def rating_error(self, rating: float) -> str | None:
        """Why `rating` is not on this bundle's scale, or None when it is."""
        steps = (rating - self.rating_min) / self.rating_step
        if not self.rating_min <= rating <= self.rating_max or abs(steps - round(steps)) > 1e-9:
            return (
                f"rating {rating:g} is not on the bundle's scale: {self.rating_min:g} to "
                f"{self.rating_max:g} in steps of {self.rating_step:g}"
            )
        return None

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "target_modules": list(self.target_modules)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BundleConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "target_modules" in known:
            known["target_modules"] = tuple(known["target_modules"])
        return cls(**known)


def _library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "hnswlib", "numpy", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def adapter_state_dict(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CFLoRA A, B and gate tensors of `lm`, by full parameter name."""
    return {
        k: v.detach().float().contiguous().cpu()
        for k, v in lm.state_dict().items()
        if ".lora_A." in k or ".lora_B." in k or ".gate." in k
    }


def base_state_dict(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights with CFLoRA wrappers removed (`x.base_layer.weight` -> `x.weight`)."""
    return {
        k.replace(".base_layer.", "."): v
        for k, v in lm.state_dict().items()
        if not (".lora_A." in k or ".lora_B." in k or ".gate." in k)
    }


def _save_hf(lm: torch.nn.Module, state: Mapping[str, torch.Tensor], folder: Path) -> None:
    """Save `state` as a stock Hugging Face checkpoint of `lm`'s architecture."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        stock = AutoModelForCausalLM.from_config(lm.config)
    stock.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, strict=False, assign=True)
    if getattr(lm.config, "tie_word_embeddings", False):
        stock.tie_weights()
    missing = [n for n, p in stock.named_parameters() if p.is_meta]
    if missing:
        raise BundleError(f"base weights lack {missing[:3]}")
    stock.save_pretrained(folder)


def write_bundle(
    folder: Path,
    *,
    lm: torch.nn.Module,
    tokenizer,  # noqa: ANN001
    din: DIN,
    items: Sequence[Item],
    item_index: ItemIndex,
    config: BundleConfig,
    spa: SPAProjector | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    llmsrec: Path | None = None,
    domain: Domain = MOVIES,
    item_keys: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Write a bundle for a CFLoRA-injected `lm` (and, from `llmsrec`, a folder written by
    `LLMSRecRanker.write` over the same base LLM); returns the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    _save_hf(lm, base_state_dict(lm), folder / "base")
    save_file(adapter_state_dict(lm), folder / "adapters.safetensors")
    if config.spa:
        if spa is None:
            raise ValueError("config.spa is on but no SPA projector was given")
        save_file(
            {k: v.detach().float().contiguous() for k, v in spa.state_dict().items()},
            folder / "spa.safetensors",
        )
    din.save(folder / "din")
    keys = dict(item_keys or {})
    (folder / "items.json").write_text(
        json.dumps(
            [
                {"item_id": i.item_id, "title": i.title, "genre": i.genre}
                | ({"key": keys[i.item_id]} if i.item_id in keys else {})
                for i in items
            ]
        )
    )
    (folder / "domain.json").write_text(domain.dumps())
    item_index.save(folder / "index")
    if llmsrec is not None:
        import shutil

        (folder / "llmsrec").mkdir(exist_ok=True)
        for name in LLMSRecRanker.FILES:
            if not (Path(llmsrec) / name).exists():
                raise BundleError(f"{llmsrec}: LLM-SRec file {name} is missing")
            shutil.copy2(Path(llmsrec) / name, folder / "llmsrec" / name)
    files = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )
    checksums = {name: file_sha256(folder / name) for name in files}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    digest = hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()
    manifest = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "model_version": f"rellax-{created[:10]}-{digest[:10]}",
        "created": created,
        "config": config.to_json(),
        "hidden_size": int(lm.config.hidden_size),
        "soft_token_ids": list(add_soft_tokens(tokenizer)),
        "answer_token_ids": list(answer_token_ids(tokenizer)),
        "metrics": dict(metrics or {}),
        "libraries": _library_versions(),
        **dict(extra or {}),
        "files": checksums,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def write_merged(
    folder: Path,
    lm: torch.nn.Module,
    tokenizer,
    g_bars: Mapping[str, torch.Tensor] | None,
    scaling: float,  # noqa: ANN001
) -> dict[str, str]:
    """The vLLM export: W0 + s·B·Ḡᵀ·A saved as a plain HF dir (+ tokenizer); returns file checksums."""
    folder = Path(folder)
    merged = merge_cflora_state_dict(lm.state_dict(), g_bars, scaling)
    clean = {k: v for k, v in merged.items() if ".gate." not in k}
    _save_hf(lm, clean, folder)
    tokenizer.save_pretrained(folder)
    return {
        p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def verify(path: Path) -> dict[str, Any]:
    """Read the manifest and check every listed file's sha256; raises BundleError naming the file."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.exists():
        raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"bundle format {manifest.get('format_version')!r}, expected {BUNDLE_FORMAT_VERSION}"
        )
    for name, expected in manifest.get("files", {}).items():
        file = Path(path) / name
        if not file.exists():
            raise BundleError(f"bundle file {name} is missing")
        if file_sha256(file) != expected:
            raise BundleError(f"bundle file {name} does not match its sha256 in {MANIFEST}")
    return manifest
