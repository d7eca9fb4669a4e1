"""`rellax serve` and `rellax load-history`. Heavy imports stay inside the commands (`rellax --help` is
instant); `load-history` reads its data set through `data/`. No part of `service/` imports `training/`
(tests/test_layers.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["curl_examples", "history_records", "keys_app", "register"]


@contextmanager
def _redis(url: str | None) -> Iterator[str]:
    """The given Redis, or the embedded demo Redis with its data kept in the cache dir."""
    if url:
        yield url
        return
    from rellax.logs import get_logger
    from rellax.paths import cache_dir
    from service.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(cache_dir("redis"), persist=True).start()
    get_logger(__name__).info("embedded redis started", url=server.url, data_dir=str(server.data_dir))
    try:
        yield server.url
    finally:
        server.stop()


def serve(
    bundle: Annotated[Path | None, typer.Option(help="Bundle dir [env RELLAX_BUNDLE; default demo].")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address [env RELLAX_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env RELLAX_PORT].")] = None,
    backend: Annotated[str | None, typer.Option(help="torch or vllm [env RELLAX_BACKEND].")] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis URL [env RELLAX_REDIS_URL; unset = embedded].")
    ] = None,
) -> None:
    """Serve the scoring API (one uvicorn worker = one model replica). Settings: RELLAX_* env vars."""
    import logging

    import uvicorn

    from rellax.logs import configure_logging
    from service.main import create_app
    from service.server import DrainingServer
    from service.settings import Settings

    overrides = {"bundle": bundle, "host": host, "port": port, "backend": backend, "redis_url": redis_url}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    if settings.log_json:  # keep the level the `rellax` callback set
        configure_logging(logging.getLevelName(logging.getLogger().level), json=True)
    with _redis(settings.redis_url) as url:
        settings = settings.model_copy(update={"redis_url": url})
        app = create_app(settings)
        typer.echo(curl_examples(settings.host, settings.port, auth=bool(settings.api_keys)))
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, workers=1, log_config=None, access_log=False,
            timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        )  # fmt: skip
        DrainingServer(config, app.state, drain_s=settings.drain_s).run()


def curl_examples(host: str, port: int, auth: bool = False) -> str:
    """Ready-to-paste calls for ML-100K user 196 and five items it has not rated (a rated one would be
    scored over its history without it, which is what the API docs say, but is not a recommendation)."""
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    key = ' -H "Authorization: Bearer $RELLAX_API_KEY"' if auth else ""
    body = '{"user_id": "196", "item_ids": [50, 302, 377, 51, 346]}'
    rerank = body[:-1] + ', "top_k": 3}'
    json_post = f"curl -s{key} -H 'Content-Type: application/json' -d"
    return "\n".join(
        [
            f"rellax is starting on {base} (ready when {base}/readyz says so). Try:",
            f"  {json_post} '{body}' {base}/v1/score",
            f"  {json_post} '{rerank}' {base}/v1/rerank",
            f"  docs: {base}/docs   metrics: {base}/metrics",
        ]
    )


def history_records(splits: tuple[str, ...], dataset: Path | None) -> tuple[list[Any], int]:
    """Per user: profile + the interactions before the first sample outside `splits`.

    The samples' global order is (timestamp, user id, item id) (docs/design.md §3); everything earlier than
    the first sample of a later split is history the service may know. For the demo (train+valid)
    the first test sample of each user then sees exactly its training-time history.
    """
    import numpy as np

    from data.loading import load_dataset
    from data.samples import SPLITS
    from rellax.entities import HistoryEvent
    from service.store import UserRecord

    data, samples, _ = load_dataset(dataset)
    later = np.flatnonzero(samples.split > max(SPLITS.index(s) for s in splits))
    profiles = data.profiles()
    records, n_events = [], 0
    for row, uid in enumerate(samples.user_ids.tolist()):
        lo, hi = int(samples.seq_ptr[row]), int(samples.seq_ptr[row + 1])
        items, ratings, stamps = samples.seq_item[lo:hi], samples.seq_rating[lo:hi], samples.seq_ts[lo:hi]
        keep = np.ones(hi - lo, dtype=bool)
        if len(later):
            j = int(later[0])
            t0, u0, i0 = int(samples.timestamp[j]), samples.user_id(j), int(samples.item_id[j])
            keep = (stamps < t0) | ((stamps == t0) & ((uid < u0) | ((uid == u0) & (items < i0))))
        events = [
            HistoryEvent(int(i), float(r), int(t))
            for i, r, t in zip(items[keep], ratings[keep], stamps[keep], strict=True)
        ]
        # The data's own user id (string ids were numbered for the samples): what callers send.
        records.append(UserRecord(user_id=data.user_key(uid), profile=profiles.get(uid), events=events))
        n_events += len(events)
    return records, n_events


def load_history(
    redis_url: Annotated[
        str | None, typer.Option(help="Redis URL [env RELLAX_REDIS_URL; unset = embedded].")
    ] = None,
    splits: Annotated[
        str, typer.Option(help="Comma list of sample splits whose history to load.")
    ] = "train,valid",
    dataset: Annotated[
        Path | None,
        typer.Option(help="Data set folder (atomic files or ML-1M .dat) [root --dataset; default ML-100K]."),
    ] = None,
    history_cap: Annotated[
        int | None, typer.Option(help="Newest events kept [env RELLAX_HISTORY_CAP].")
    ] = None,
) -> None:
    """Bulk-load a data set's interactions and profiles into Redis (pipelined; safe to re-run)."""
    from tqdm import tqdm

    from service.settings import Settings
    from service.store import HistoryStore, connect

    settings = Settings()
    wanted = tuple(s.strip() for s in splits.split(",") if s.strip())
    records, n_events = history_records(wanted, dataset)

    async def run(url: str) -> int:
        client = connect(url, timeout_s=10.0)
        try:
            store = HistoryStore(client, cap=history_cap or settings.history_cap)
            return await store.bulk_load(tqdm(records, desc="load-history", unit="user"))
        finally:
            await client.aclose()

    with _redis(redis_url or settings.redis_url) as url:
        n_users = asyncio.run(run(url))
    typer.echo(f"loaded {n_users} users, {n_events} events ({'+'.join(wanted)}) into {url}")


keys_app = typer.Typer(help="API keys: RELLAX_API_KEYS holds their SHA-256 digests, never the keys.")


@keys_app.command("hash")
def keys_hash(
    key: Annotated[str | None, typer.Argument(help="The key; omit it to read lines from stdin.")] = None,
) -> None:
    """Print the RELLAX_API_KEYS entry (sha256:<hex>) for a key; stdin keeps keys out of shell history."""
    import sys

    from service.keys import MIN_KEY_CHARS, hash_key

    keys = [key] if key is not None else [line.strip() for line in sys.stdin if line.strip()]
    if not keys:
        raise typer.BadParameter("no key given (argument or stdin)", param_hint="KEY")
    for k in keys:
        if len(k) < MIN_KEY_CHARS:
            raise typer.BadParameter(f"keys must be at least {MIN_KEY_CHARS} characters", param_hint="KEY")
        typer.echo(hash_key(k))


@keys_app.command("new")
def keys_new() -> None:
    """Make a random key: prints the key (give it to the client, once) and its digest (configure it)."""
    from service.keys import hash_key, new_key

    key = new_key()
    typer.echo(f"key:    {key}\ndigest: {hash_key(key)}")


def register(app: typer.Typer) -> None:
    """Add the service's top-level commands to the `rellax` CLI."""
    app.command("serve")(serve)
    app.command("load-history")(load_history)
    app.add_typer(keys_app, name="keys")
