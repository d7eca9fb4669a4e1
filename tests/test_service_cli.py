"""The service's CLI commands for real: `rellax load-history` into Redis, `rellax serve` as a process
with its embedded Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from service_support import tiny_bundle, tiny_bundle_path
from typer.testing import CliRunner

from cli.main import app
from rellax import allocator
from service.embedded_redis import free_port
from service.settings import Settings
from service.store import HistoryStore, connect


def test_load_history_loads_train_and_valid_history(redis_url: str, ml100k_samples) -> None:  # noqa: ANN001
    result = CliRunner().invoke(app, ["load-history", "--redis-url", redis_url])
    assert result.exit_code == 0, result.output
    assert "loaded 943 users" in result.output
    samples = ml100k_samples
    first_test = int(samples.indices("test")[0])
    # a user whose first test sample comes right at the split: Redis holds exactly that sample's history
    uid = samples.user_id(first_test)
    items, ratings, stamps = samples.history(first_test)

    async def fetch() -> tuple:
        client = connect(redis_url)
        try:
            store = HistoryStore(client)
            return await store.fetch(str(uid)), await store.fetch("196")
        finally:
            await client.aclose()

    state, other = asyncio.run(fetch())
    assert [e.item_id for e in state.history] == items.tolist()
    assert [e.rating for e in state.history] == ratings.tolist()
    assert [e.timestamp for e in state.history] == stamps.tolist()
    assert state.profile is not None and state.profile.gender in {"male", "female"}
    assert other.profile is not None and len(other.history) > 0
    # everything stored precedes the test split in time
    assert max(e.timestamp for e in other.history) <= int(samples.timestamp[first_test])
    again = CliRunner().invoke(app, ["load-history", "--redis-url", redis_url])
    assert again.exit_code == 0
    assert len(asyncio.run(fetch())[1].history) == len(other.history)  # re-running adds nothing


def redis_children(parent: int) -> list[int]:
    """Pids of the live redis-server processes whose parent is `parent` (redis rewrites its argv)."""
    pids = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc_dir / "stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if comm.startswith("redis-server") and rest[0] != "Z" and int(rest[1]) == parent:
            pids.append(int(proc_dir.name))
    return pids


def gone(pid: int, within_s: float) -> bool:
    """True once `pid` has exited (and was reaped, or is a zombie) within `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_embedded_redis_dies_with_a_killed_parent(tmp_path: Path) -> None:
    """SIGKILL runs no clean-up code: the kernel must stop the child (orphaned Redis)."""
    script = (
        "import sys, time; from pathlib import Path; from service.embedded_redis import EmbeddedRedis; "
        "r = EmbeddedRedis(Path(sys.argv[1]), persist=False).start(); print(r.pid, flush=True); "
        "time.sleep(600)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "r")], stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(parent.stdout.readline())
        assert redis_children(parent.pid) == [child]
    finally:
        parent.kill()
        parent.wait(timeout=10)
    assert gone(child, within_s=5)


def test_serve_starts_embedded_redis_and_answers(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "RELLAX_CACHE_DIR": str(tmp_path / "cache"),
        "RELLAX_DTYPE": "float32",
        "RELLAX_LOG_JSON": "true",
    }
    env.pop("RELLAX_REDIS_URL", None)
    for unset in ("GLIBC_TUNABLES", "RELLAX_MALLOC_TUNING"):
        env.pop(unset, None)  # so the tuned start-up below is `rellax`'s own re-exec (rellax/allocator.py)
    cmd = [
        sys.executable,
        "-m",
        "cli",
        "serve",
        "--bundle",
        str(tiny_bundle_path()),
        "--port",
        str(port),
    ]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert ready is not None and ready.status_code == 200, (tmp_path / "serve.log").read_text()[-3000:]
        assert ready.json()["malloc_tuned"] is allocator.wanted(env)
        item = sorted(tiny_bundle().items)[0]
        r = httpx.post(f"{url}/v1/score", json={"user_id": "196", "item_ids": [item]}, timeout=60)
        assert r.status_code == 200 and r.json()["cold_start"] is True
        redis = redis_children(proc.pid)
        assert len(redis) == 1, redis
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert "/v1/score" in output and "curl" in output
    assert gone(redis[0], within_s=5)  # SIGTERM to `rellax serve` stops its embedded Redis too
    assert (tmp_path / "cache" / "redis").is_dir()  # the embedded Redis kept its data in the cache


def test_sigterm_drains_then_finishes_in_flight_requests_and_exits(tmp_path: Path, redis_url: str) -> None:
    """SIGTERM to a real `rellax serve`: /readyz turns 503 at once while requests are still served
    (RELLAX_DRAIN_S), then new connections are refused, requests already in flight (held 3 s in the
    batcher by RELLAX_MAX_WAIT_MS) still get their scores, and the process exits soon after."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    env = {
        **os.environ,
        "RELLAX_CACHE_DIR": str(tmp_path / "cache"),
        "RELLAX_DTYPE": "float32",
        "RELLAX_LOG_JSON": "true",
        "RELLAX_DRAIN_S": "1.0",
        "RELLAX_MAX_WAIT_MS": "3000",
        "RELLAX_DEADLINE_MS": "30000",
    }
    cmd = [sys.executable, "-m", "cli", "serve", "--bundle", str(tiny_bundle_path())]
    cmd += ["--port", str(port), "--redis-url", redis_url]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    items = sorted(tiny_bundle().items)[:2]

    def score(item: int) -> httpx.Response:
        with httpx.Client(timeout=30) as client:  # its own connection, as a new client's would be
            return client.post(f"{url}/v1/score", json={"user_id": "drain", "item_ids": [item]})

    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(score, items[0])
            time.sleep(0.5)  # the first request now waits in the batcher
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            draining = httpx.get(f"{url}/readyz", timeout=5)
            second = pool.submit(score, items[1])  # during the drain: still accepted
            time.sleep(1.4)  # past the drain: both requests are still in flight
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/healthz", timeout=2)
            assert not first.done() and not second.done()
            answers = [first.result(timeout=30), second.result(timeout=30)]
        exited_in = time.monotonic()
        proc.wait(timeout=15)
        exited_in = time.monotonic() - exited_in
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert draining.status_code == 503 and draining.json()["checks"]["accepting"] is False
    assert draining.json()["checks"]["redis"] is True  # only the drain makes it unready
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert all(0.0 < a.json()["items"][0]["p_click"] < 1.0 for a in answers)
    assert exited_in < 5.0
    assert proc.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    assert "draining" in (tmp_path / "serve.log").read_text()


def test_keys_new_and_hash_print_what_the_service_accepts() -> None:
    from service.auth import key_matches
    from service.keys import hash_key

    runner = CliRunner()
    made = runner.invoke(app, ["keys", "new"])
    assert made.exit_code == 0, made.output
    key = made.output.split("key:")[1].split()[0]
    digest = made.output.split("digest:")[1].split()[0]
    assert len(key) >= 40 and digest == hash_key(key)
    hashed = runner.invoke(app, ["keys", "hash"], input=f"{key}\n\n{'x' * 16}\n")  # stdin: one per line
    assert hashed.exit_code == 0 and hashed.output.split() == [digest, hash_key("x" * 16)]
    assert key_matches(key, Settings(_env_file=None, api_keys=digest).api_keys) == digest
    short = runner.invoke(app, ["keys", "hash", "short"])
    assert short.exit_code == 2 and "at least 16 characters" in short.output


def test_serve_refuses_a_tampered_bundle_naming_the_file(tmp_path: Path, redis_url: str) -> None:
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_path(), bundle)
    items = bundle / "items.json"
    items.write_text(items.read_text().replace("Night", "Nite", 1))  # one title changed
    cmd = [sys.executable, "-m", "cli", "serve", "--bundle", str(bundle), "--port", str(free_port())]
    cmd += ["--redis-url", redis_url]
    env = {**os.environ, "RELLAX_DTYPE": "float32", "RELLAX_LOG_JSON": "true"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    refused = [json.loads(line) for line in done.stderr.splitlines() if "cannot serve this bundle" in line]
    assert refused and refused[0]["level"] == "error", done.stderr[-2000:]
    assert refused[0]["reason"] == "bundle file items.json does not match its sha256 in manifest.json"
