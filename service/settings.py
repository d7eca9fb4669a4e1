"""Service configuration: every knob is a `RELLAX_*` environment variable (or a root `.env` line).

The README's configuration table is generated from these fields, so every field carries a description;
`config_table()` renders it. Components get plain arguments taken from here, never this object, except
the app factory and the CLI that wire them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from rellax.paths import cache_dir
from service.keys import MIN_KEY_CHARS, is_hashed

__all__ = ["Settings", "config_table", "default_bundle_path"]


def default_bundle_path() -> Path:
    """The demo bundle `make demo` exports (not created here: `cache_dir()` only makes the root)."""
    return cache_dir() / "bundles" / "demo"


class Settings(BaseSettings):
    """All settings of one service replica (one uvicorn worker, one model engine)."""

    model_config = SettingsConfigDict(env_prefix="RELLAX_", env_file=".env", extra="ignore")

    bundle: Path = Field(
        default_factory=default_bundle_path,
        description="Bundle directory to serve (default: the demo bundle in the cache).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description=(
            "Dtype the torch backend scores in: auto = float32, the reference; bfloat16 (bf16 linear "
            "weights, fp32 residual stream) is ~2x faster on CPUs with AMX/AVX-512-BF16 but moved P(yes) "
            "by up to 0.028; float16 (the same recipe in fp16) stays within 0.005 of fp32, at about "
            "fp32's speed on CPUs without AMX-FP16 (benchmarks/results/precision.md). vLLM: its own "
            "choice (see its backend)."
        ),
    )
    backend: Literal["torch", "vllm"] = Field(
        "torch", description="Model backend: torch (exact CFLoRA, on the CPU) or vllm (merged export, GPU)."
    )
    max_merge_auc_drop: float = Field(
        0.01,
        ge=0,
        description="vllm only: refuse to start when the bundle's merged export lost more valid AUC than "
        "this against exact CFLoRA (the export measures both; a model that relies on per-instance gates "
        "can lose everything when they are folded in at their mean).",
    )
    redis_url: str | None = Field(
        None,
        description="Redis holding user histories; unset = `rellax serve` starts an embedded redis-server "
        "with its data in the cache dir (demo only).",
    )
    redis_timeout_ms: int = Field(
        500, ge=10, description="Redis connect/read timeout; a request fails over to 503 after it."
    )
    max_batch: int = Field(64, ge=1, description="Most candidates per model batch.")
    torch_rows: int = Field(
        4,
        ge=1,
        description="Torch backend: prompts per forward pass; a batch runs in length-sorted chunks of this "
        "many (2-core CPU, demo bundle: 1.68 candidates/s at 4, 1.08 at 48, benchmarks/torch_rows.py).",
    )
    max_tokens: int = Field(
        16384, ge=256, description="Most padded tokens per model batch (longest prompt x batch size)."
    )
    max_wait_ms: float = Field(
        5.0, ge=0, description="How long the batcher waits for more candidates before running a batch."
    )
    max_queue: int = Field(
        1024, ge=1, description="Most candidates waiting for the model; beyond it requests get 503 at once."
    )
    deadline_ms: int = Field(
        2000, ge=1, description="Per-request deadline; candidates still queued after it are not computed."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API key digests (`rellax keys hash`: sha256:<hex>) for /v1 routes, "
        "sent as Bearer or X-API-Key; a plain key is accepted with a warning; empty = auth off.",
    )
    rate_limit_rps: float = Field(
        0.0,
        ge=0,
        description="Requests/s each API key (with auth off: each client address) may make to /v1 in "
        "this replica; beyond it 429 with Retry-After. 0 = no limit.",
    )
    rate_limit_burst: int = Field(
        20, ge=1, description="Requests a key may make at once before RELLAX_RATE_LIMIT_RPS applies."
    )
    k: int | None = Field(
        None, ge=1, le=100, description="History items retrieved per candidate (SUBR); unset = bundle's K."
    )
    history_cap: int = Field(1000, ge=1, description="Newest events kept per user in Redis.")
    max_candidates: int = Field(
        200, ge=1, description="Most candidates ReLLaX scores in one request (/v1/score, /v1/rerank)."
    )
    max_rank_candidates: int = Field(
        2000, ge=1,
        description="Most item ids in one /v1/rerank request with strategy llmsrec or cascade.",
    )  # fmt: skip
    cascade_m: int = Field(
        10, ge=1, description="Cascade: LLM-SRec's top M that ReLLaX re-scores (request `m`)."
    )
    cascade_m_max: int = Field(50, ge=1, description="Largest `m` a /v1/rerank request may ask for.")
    generate_n: int = Field(
        100,
        ge=1,
        description="/v1/rerank without item_ids: candidates LLM-SRec retrieves (request `n_candidates`).",
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted request body (413 above).")
    overload_mode: Literal["reject", "degrade"] = Field(
        "reject",
        description="Queue full: reject = 503 with Retry-After; degrade = DIN's own score, degraded: true.",
    )
    redis_down_mode: Literal["reject", "degrade"] = Field(
        "reject",
        description="Redis unreachable: reject = 503; degrade = DIN-only score on an empty history.",
    )
    drain_s: float = Field(
        2.0,
        ge=0,
        description="On SIGTERM: seconds /readyz answers 503 while requests are still served, before "
        "`rellax serve` stops accepting connections (0 = stop at once).",
    )
    shutdown_timeout_s: float = Field(
        15.0, ge=0, description="After the drain: the longest in-flight requests may take to finish."
    )
    host: str = Field("127.0.0.1", description="Address `rellax serve` binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port `rellax serve` binds.")
    log_json: bool = Field(False, description="Log JSON lines (default: key=value on a TTY, JSON otherwise).")

    def fits_in_deadline(self, candidates_per_s: float) -> int:
        """Candidates one request can have scored within the deadline at this model rate."""
        return int(candidates_per_s * self.deadline_ms / 1000)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _refuse_weak_keys(cls, keys: list[str]) -> list[str]:
        short = [f"#{n}" for n, key in enumerate(keys) if not is_hashed(key) and len(key) < MIN_KEY_CHARS]
        if short:
            raise ValueError(f"API keys must be at least 16 characters; too short: {', '.join(short)}")
        return keys


def config_table() -> str:
    """The README's configuration table (markdown), straight from the field descriptions."""
    rows = ["| variable | default | description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = "bundle dir in cache" if name == "bundle" else "empty"
        else:
            default = "unset" if field.default is None else str(field.default)
        rows.append(f"| `RELLAX_{name.upper()}` | {default} | {field.description} |")
    return "\n".join(rows)
