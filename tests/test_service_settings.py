"""Settings from the environment, the documented configuration table, public surfaces and import
hygiene of the service package."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.auth import RateLimiter, key_digests, key_matches
from service.keys import hash_key
from service.settings import Settings, config_table

SERVICE_MODULES = [
    "service.api",
    "service.auth",
    "service.batcher",
    "service.cli",
    "service.deps",
    "service.errors",
    "service.keys",
    "service.main",
    "service.middleware",
    "service.pipeline",
    "service.schemas",
    "service.server",
    "service.settings",
    "service.store",
    "service.backends.torch_backend",
]


def test_env_vars_with_prefix_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELLAX_MAX_BATCH", "16")
    monkeypatch.setenv("RELLAX_API_KEYS", " first-key-0123456789 , second-key-0123456789,")
    monkeypatch.setenv("RELLAX_OVERLOAD_MODE", "degrade")
    monkeypatch.setenv("RELLAX_K", "10")
    s = Settings(_env_file=None)
    assert s.max_batch == 16 and s.overload_mode == "degrade" and s.k == 10
    assert s.api_keys == ["first-key-0123456789", "second-key-0123456789"]
    assert Settings(_env_file=None, api_keys="").api_keys == []


@pytest.mark.parametrize(
    ("env", "value", "needle"),
    [
        ("RELLAX_API_KEYS", "short,long-enough-key-0123", "too short: #0"),
        ("RELLAX_BACKEND", "tensorrt", "backend"),
        ("RELLAX_MAX_BATCH", "0", "max_batch"),
        ("RELLAX_OVERLOAD_MODE", "drop", "overload_mode"),
    ],
)
def test_bad_values_fail_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError, match=needle):
        Settings(_env_file=None)


def test_every_setting_is_documented_in_the_table() -> None:
    table = config_table()
    for name, field in Settings.model_fields.items():
        assert field.description and len(field.description) > 15, name
        assert f"`RELLAX_{name.upper()}`" in table
    for name in ("BUNDLE", "REDIS_URL", "BACKEND", "MAX_BATCH", "MAX_TOKENS", "MAX_WAIT_MS", "MAX_QUEUE",
                 "DEADLINE_MS", "API_KEYS", "K", "HISTORY_CAP", "MAX_CANDIDATES", "MAX_BODY_BYTES",
                 "OVERLOAD_MODE", "REDIS_DOWN_MODE", "HOST", "PORT", "LOG_JSON"):  # fmt: skip
        assert f"`RELLAX_{name}`" in table


def test_defaults_match_the_issue() -> None:
    s = Settings(_env_file=None)
    assert (s.max_batch, s.max_tokens, s.max_wait_ms, s.deadline_ms) == (64, 16384, 5.0, 2000)
    assert (s.history_cap, s.max_candidates, s.port, s.backend) == (1000, 200, 8000, "torch")
    assert s.redis_url is None and s.api_keys == [] and s.k is None


def test_key_matching_is_exact_and_never_takes_the_digest_for_the_key() -> None:
    keys = [hash_key("a" * 20), hash_key("b" * 20)]
    assert key_matches("b" * 20, keys) == keys[1]
    assert not key_matches("b" * 19, keys) and not key_matches("b" * 21, keys) and not key_matches("", keys)
    assert key_matches(keys[1], keys) is None  # a leaked digest is not a key
    assert key_digests(["c" * 20, keys[0]]) == [hash_key("c" * 20), keys[0]]  # plain ones hashed


def test_digests_pass_the_length_rule_and_short_plain_keys_do_not() -> None:
    s = Settings(_env_file=None, api_keys=f"{hash_key('k' * 16)},{'p' * 16}")
    assert s.api_keys[0].startswith("sha256:") and len(s.api_keys[0]) == 71
    with pytest.raises(ValueError, match="at least 16 characters; too short: #1"):
        Settings(_env_file=None, api_keys=f"{hash_key('k' * 16)},short")


def test_rate_limiter_is_a_token_bucket_per_caller() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.acquire("a", now=10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a", now=10.0) == pytest.approx(0.5)  # one token comes back in 0.5 s
    assert limiter.acquire("b", now=10.0) == 0.0  # another caller has its own bucket
    assert limiter.acquire("a", now=10.5) == 0.0 and limiter.acquire("a", now=10.5) > 0
    assert [limiter.acquire("a", now=100.0) for _ in range(4)][-1] > 0  # refills to the burst, no more


def test_rate_limiter_forgets_refilled_callers_past_its_size() -> None:
    limiter = RateLimiter(rate=1.0, burst=2, max_callers=3)
    for n, caller in enumerate("abc"):
        limiter.acquire(caller, now=float(n))
    limiter.acquire("d", now=3.5)  # a and b refilled (2 s at 1/s since their last call): forgotten
    assert set(limiter._buckets) == {"c", "d"}  # c (1.5 s ago) is still refilling: kept


@pytest.mark.parametrize("module", SERVICE_MODULES)
def test_all_is_sorted_and_complete(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__all__ == sorted(mod.__all__)
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name}"


def test_service_never_imports_training_torch_or_vllm_at_import() -> None:
    code = (
        "import sys, service.main, service.cli, service.store, service.batcher;"
        "bad = [m for m in ('training', 'torch', 'vllm', 'transformers') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
