"""The bundle: everything the service needs to score, in one directory, checksummed (issue 3 §6).

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
    merged/                optional: W0 + s·B·Ḡᵀ·A as a plain HF dir for vLLM (DESIGN §8)
    llmsrec/               optional: LLM-SRec's small modules, the catalogue's item vectors, their
                           hnswlib index and the SASRec teacher (`rellax.llmsrec.LLMSRecRanker`); it
                           reads the base LLM above with the adapters off

`Bundle.load` verifies every checksum before reading (a mismatch names the file) and builds the
exact-mode runtime: `prepare` turns (profile, history, candidates) into model inputs through the same
`Featurizer` the trainers use, `score_inputs` runs them.
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

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rellax import precision
from rellax.cflora import inject_cflora, merge_cflora_state_dict
from rellax.din import DIN
from rellax.domain import MOVIES, Domain
from rellax.entities import HistoryEvent, Item, Profile
from rellax.errors import BundleError
from rellax.features import Featurizer, History, Mode
from rellax.item_index import ItemIndex
from rellax.llmsrec import LLMSRecRanker
from rellax.model_input import ModelInput
from rellax.prompt import Prompt
from rellax.scorer import Scorer, ScoringModel
from rellax.spa import SPAProjector
from rellax.tokens import add_soft_tokens, answer_token_ids

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "Bundle",
    "BundleConfig",
    "Prepared",
    "adapter_state_dict",
    "base_state_dict",
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
    # The data set's rating scale (MovieLens: whole stars 1-5; label data: 1 or 5); the service rejects events off it.
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


@dataclass(frozen=True, slots=True)
class Prepared:
    """One candidate ready to score, plus what the response reports about it."""

    item_id: int
    prompt: Prompt
    model_input: ModelInput
    retrieved: list[int]
    din_prob: float


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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
    checksums = {name: _sha256(folder / name) for name in files}
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
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


class Bundle:
    """A loaded bundle: catalogue, index, DIN, tokenizer and the exact-mode scorer."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        featurizer: Featurizer,
        scorer: Scorer,
        llmsrec: LLMSRecRanker | None = None,
    ) -> None:
        self.path, self.manifest = path, manifest
        self.config = BundleConfig.from_json(manifest["config"])
        self.featurizer, self.scorer = featurizer, scorer
        self.items: dict[int, Item] = dict(featurizer.items)
        self.llmsrec = llmsrec  # None: the bundle has no LLM-SRec (re-ranking by ReLLaX only)

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def dtype(self) -> str:
        """The dtype the model computes in ("float32" / "bfloat16"): `dtype="auto"` resolved."""
        return precision.name(self.scorer.dtype)

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    @classmethod
    def load(cls, path: Path | str, dtype: str = "auto") -> Bundle:
        """Verify checksums, then load every part.

        dtype: "auto" (= float32, `rellax.precision.resolve`), "float32" or "bfloat16";
            bf16 is `rellax.precision`'s recipe (the SPA projector and CFLoRA gates stay fp32).
        """
        path = Path(path)
        manifest = verify(path)
        config = BundleConfig.from_json(manifest["config"])
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        lm = AutoModelForCausalLM.from_pretrained(path / "base", dtype=torch.float32)
        inject_cflora(lm, config.r, config.alpha, config.dropout, config.target_modules,
                      config.gate_dim if config.gated else None)  # fmt: skip
        _load_into(lm, load_file(path / "adapters.safetensors"), "adapters.safetensors")
        spa = None
        if config.spa:
            spa = SPAProjector(int(json.loads((path / "din" / "config.json").read_text())["embed_dim"]),
                               int(lm.config.hidden_size))  # fmt: skip
            _load_into(spa, load_file(path / "spa.safetensors"), "spa.safetensors", strict=True)
        din = DIN.load(path / "din").eval()
        items = {int(d["item_id"]): Item(int(d["item_id"]), d["title"], d["genre"])
                 for d in json.loads((path / "items.json").read_text())}  # fmt: skip
        index = ItemIndex.load(path / "index")
        yes, no = answer_token_ids(tokenizer)
        model = ScoringModel(lm, yes, no, spa=spa).eval()
        scorer = Scorer(model, dtype=precision.resolve(dtype), pad_id=int(tokenizer.pad_token_id or 0))
        domain = (
            Domain.from_json(json.loads((path / "domain.json").read_text()))
            if (path / "domain.json").exists()
            else MOVIES
        )
        featurizer = Featurizer(tokenizer, items, index, din, k=config.k, spa=config.spa, domain=domain)
        llmsrec = None
        if (path / "llmsrec").is_dir():  # after Scorer: it reads the base in the dtype the scorer set
            llmsrec = LLMSRecRanker.load(path / "llmsrec", lm, tokenizer, items, domain)
        return cls(path, manifest, featurizer, scorer, llmsrec)

    def prepare(
        self,
        profile: Profile,
        history: Sequence[HistoryEvent],
        candidate_ids: Sequence[int],
        k: int | None = None,
        user_id: int | str | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[Prepared]:
        """SUBR + prompt + DIN (h, own CTR) + SPA vectors for each candidate of one user.

        Raises `UnknownItem` for candidates outside the catalogue. `user_id` feeds DIN's user
        embedding (unknown or non-numeric ids use the cold-start row). With `timings`, the seconds
        spent in "subr", "prompt" and "crm" (DIN + SPA vectors) are added to it.
        """
        f = self.featurizer
        f.check_candidates(candidate_ids)
        hist = History([e.item_id for e in history], [e.rating for e in history])
        prompts = f.prompts(profile, hist, candidate_ids, self.config.mode, k=k, timings=timings)
        started = time.perf_counter()
        uid = (
            int(user_id)
            if isinstance(user_id, int) or (isinstance(user_id, str) and user_id.isdigit())
            else None
        )
        n = len(candidate_ids)
        batch = f.din_batch([uid] * n, [profile] * n, candidate_ids, [hist] * n)
        din_probs, h = f.din_outputs(batch)
        vectors = self.project(f.soft_embeddings(prompts)) if self.config.spa else [None] * n
        gate_h = h.numpy() if self.config.gated else [None] * n
        if timings is not None:
            timings["crm"] = timings.get("crm", 0.0) + time.perf_counter() - started
        return [
            Prepared(
                item_id=int(c),
                prompt=p,
                model_input=ModelInput(p.input_ids, p.soft_positions, v, gate_h[i]),
                retrieved=list(p.hist_item_ids),
                din_prob=float(din_probs[i]),
            )
            for i, (c, p, v) in enumerate(zip(candidate_ids, prompts, vectors, strict=True))
        ]

    @torch.no_grad()
    def project(self, embeddings: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """SPA outputs (n_i, H) float32 for per-prompt DIN embeddings (n_i, E)."""
        spa = self.scorer.model.spa
        if spa is None:
            raise BundleError("this bundle has no SPA projector")
        if not embeddings:
            return []
        dtype = next(spa.parameters()).dtype
        # One projection for every prompt of the request, as training does (ScoringModel.embed):
        # eight small per-prompt calls cost ~3 ms of op overhead on a 2-core CPU, one costs ~0.4.
        flat = spa(torch.cat(list(embeddings)).to(dtype)).float().numpy()
        return np.split(flat, np.cumsum([len(e) for e in embeddings])[:-1])

    def score_inputs(self, inputs: Sequence[ModelInput], max_rows: int = 64) -> np.ndarray:
        """P(yes) for model inputs (exact CFLoRA with each input's own gate), in input order; the
        model runs length-sorted chunks of at most `max_rows` prompts (what a CPU's caches favour)."""
        if not inputs:
            return np.zeros(0)
        vectors = [mi.soft_vectors for mi in inputs] if any(mi.soft_positions for mi in inputs) else None
        gates = [mi.gate_h for mi in inputs]
        h = None if any(g is None for g in gates) else torch.from_numpy(np.stack(gates).astype(np.float32))
        return self.scorer.score(inputs, soft_vectors=vectors, h=h, projected=True, max_batch=max_rows)  # type: ignore[arg-type]

    def score_prepared(self, prepared: Sequence[Prepared]) -> np.ndarray:
        """P(yes) for prepared candidates: the call the torch backend and the parity tests share."""
        return self.score_inputs([p.model_input for p in prepared])


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
        if _sha256(file) != expected:
            raise BundleError(f"bundle file {name} does not match its sha256 in {MANIFEST}")
    return manifest


def _load_into(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str, strict: bool = False
) -> None:
    result = module.load_state_dict(dict(state), strict=False)
    if result.unexpected_keys:
        raise BundleError(f"{name} has tensors the model lacks, e.g. {result.unexpected_keys[:3]}")
    wanted = [k for k in result.missing_keys if strict or ".lora_" in k or ".gate." in k]
    if wanted:
        raise BundleError(f"{name} lacks tensors, e.g. {wanted[:3]}")
