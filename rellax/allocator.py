"""glibc malloc settings for PyTorch on CPU: keep freed activation memory in the process.

A forward pass over a batch of prompts allocates and frees activation tensors of tens of MB each
(10,515 tokens x 1,536 MLP channels in fp32 is 65 MB). With glibc's defaults such a block is a
fresh `mmap`, handed back to the kernel on `free`; below the (dynamic) mmap threshold, PyTorch's
64-byte-aligned `posix_memalign` leaves the freed block a few bytes too small for the next request
of the same size (its split-off remainder sits in the thread cache, which never coalesces), so the
heap grows instead. Either way every allocation touches new pages and pays one page fault per
4 KiB: measured, a 48 MB tensor in a worker thread cost its 12,288 faults every time. PyTorch has no
caching allocator on CPU, so the process's malloc is where this is fixed. The tunables below keep
blocks under 1 GiB on the heap, never trim it, put every thread on the main arena (per-thread heaps
cap at 64 MB) and turn the thread cache off so freed blocks coalesce: 0 faults for the same tensor,
and fp32 scoring 1.08x (the service's 4-prompt passes) to 1.23x (one 32-prompt pass) faster on a
2-core Xeon (benchmarks/results/allocator.md). The price: the process keeps its peak heap (RSS does
not shrink after a large batch).

glibc reads GLIBC_TUNABLES only when the process starts, so `rellax` re-executes itself once with
them set (`reexec_with_tuning`, from the console entry point) unless they are already there, the
vLLM backend is asked for, or RELLAX_MALLOC_TUNING=0. A tunable the user set themselves is kept.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

__all__ = ["SWITCH", "TUNING", "VARIABLE", "is_tuned", "reexec_with_tuning", "tuned_env", "wanted"]

TUNING: dict[str, str] = {
    "glibc.malloc.mmap_threshold": str(1 << 30),  # blocks under 1 GiB come from the heap, not mmap
    "glibc.malloc.trim_threshold": str(1 << 40),  # freed memory stays in the process for the next batch
    "glibc.malloc.arena_max": "1",  # worker threads share the main arena
    "glibc.malloc.tcache_count": "0",  # freed blocks coalesce, so an aligned block of the same size fits
}
VARIABLE = "GLIBC_TUNABLES"
SWITCH = "RELLAX_MALLOC_TUNING"


def _parse(tunables: str) -> dict[str, str]:
    pairs = (item.partition("=") for item in tunables.split(":") if item)
    return {key: value for key, _, value in pairs}


def _backend(env: Mapping[str, str], argv: Sequence[str]) -> str:
    """The serving backend asked for: `--backend X` / `--backend=X` on the command line, else the env."""
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--backend="):
            return arg.partition("=")[2]
    return env.get("RELLAX_BACKEND", "torch")


def wanted(env: Mapping[str, str], argv: Sequence[str] = ()) -> bool:
    """Tuning applies to glibc processes running PyTorch on the CPU: not where RELLAX_MALLOC_TUNING
    is 0/false/off, and not for the vLLM backend (its engine manages its own memory, on the GPU)."""
    if env.get(SWITCH, "1").strip().lower() in {"0", "false", "off", "no"}:
        return False
    if _backend(env, argv).strip().lower() == "vllm":
        return False
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def is_tuned(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process started with every tunable set (by us or by the user)."""
    return TUNING.keys() <= _parse(env.get(VARIABLE, "")).keys()


def tuned_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the tunables it lacks added to GLIBC_TUNABLES; the user's own values win."""
    merged = {**TUNING, **_parse(env.get(VARIABLE, ""))}
    return {**env, VARIABLE: ":".join(f"{key}={value}" for key, value in merged.items())}


def reexec_with_tuning() -> None:
    """Replace this process with itself, same argv and pid, started with the tunables set.

    Call it first thing in an entry point, before threads or child processes exist. It returns
    (doing nothing) where tuning is off, not glibc, or already in place."""
    if is_tuned() or not wanted(os.environ, sys.argv):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], tuned_env(os.environ))
