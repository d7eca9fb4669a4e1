"""The glibc malloc settings `rellax` starts with: what they change, measured in page faults (not
time), and the re-exec that applies them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rellax import allocator

pytestmark = pytest.mark.skipif(
    not allocator.wanted({}),
    reason="the malloc tunables are glibc's; elsewhere rellax leaves the allocator alone",
)

# A 48 MB tensor allocated and freed five times in a worker thread (where the service's model runs):
# the minor page faults each allocation costs once the first two have warmed the allocator up.
FAULTS = textwrap.dedent(
    """
    import resource, threading, torch
    def run(out):
        for _ in range(2):
            torch.ones(12 << 20)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            torch.ones(12 << 20)
        out.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
    out = []
    worker = threading.Thread(target=run, args=(out,))
    worker.start()
    worker.join()
    print(out[0])
    """
)
PAGES = (48 << 20) // os.sysconf("SC_PAGE_SIZE")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (allocator.VARIABLE, allocator.SWITCH)}
    return {**env, **extra}


def _faults(env: dict[str, str]) -> float:
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


def _thp_always() -> bool:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return thp.exists() and "[always]" in thp.read_text()


@pytest.mark.skipif(
    _thp_always(), reason="transparent huge pages 'always': faults come per 2 MB, not per 4 KiB page"
)
def test_tuned_malloc_reuses_freed_activation_memory_in_worker_threads() -> None:
    untuned = _faults(_clean_env())
    tuned = _faults(allocator.tuned_env(_clean_env()))
    # glibc's defaults: every allocation maps fresh pages and faults on each one of them
    assert untuned > 0.5 * PAGES, (untuned, PAGES)
    # tuned: the freed block is reused, already mapped
    assert tuned < 0.05 * PAGES, (tuned, PAGES)


REPORT = (
    "import os; from rellax.allocator import reexec_with_tuning; reexec_with_tuning(); "
    "print(os.environ.get('GLIBC_TUNABLES'), os.getpid())"
)


def _after_reexec(env: dict[str, str]) -> tuple[dict[str, str] | None, int, int]:
    """The GLIBC_TUNABLES a child ends up running with (parsed), its pid and the pid we started."""
    proc = subprocess.Popen([sys.executable, "-c", REPORT], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    tunables, pid = out.split()
    parsed = None if tunables == "None" else dict(item.split("=") for item in tunables.split(":"))
    return parsed, int(pid), proc.pid


def test_reexec_starts_the_same_process_again_with_the_tunables() -> None:
    tunables, pid, child = _after_reexec(_clean_env())
    assert tunables == allocator.TUNING
    assert pid == child  # exec, not a child process: signals and the pid stay the supervisor's


def test_reexec_keeps_the_users_own_tunables_and_can_be_switched_off() -> None:
    mine = "glibc.malloc.arena_max=4:glibc.mem.tagging=0"
    tunables, _, _ = _after_reexec(_clean_env(GLIBC_TUNABLES=mine))
    assert tunables == {**allocator.TUNING, "glibc.malloc.arena_max": "4", "glibc.mem.tagging": "0"}
    for off in ("0", "false", "OFF"):
        tunables, _, _ = _after_reexec(_clean_env(RELLAX_MALLOC_TUNING=off))
        assert tunables is None


def test_tuned_env_and_the_switch() -> None:
    env = allocator.tuned_env({"X": "y"})
    assert env["X"] == "y" and allocator.is_tuned(env)
    assert not allocator.is_tuned({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})
    assert not allocator.is_tuned({})
    assert allocator.wanted({}) and allocator.wanted({"RELLAX_MALLOC_TUNING": "1"})
    assert not allocator.wanted({"RELLAX_MALLOC_TUNING": "no"})
    # the vLLM backend's engine is left alone, asked for in the env or on the command line
    assert not allocator.wanted({"RELLAX_BACKEND": "vllm"})
    assert not allocator.wanted({}, ["rellax", "serve", "--backend", "vllm"])
    assert not allocator.wanted({"RELLAX_BACKEND": "torch"}, ["rellax", "serve", "--backend=vllm"])
    assert allocator.wanted({"RELLAX_BACKEND": "vllm"}, ["rellax", "serve", "--backend", "torch"])
