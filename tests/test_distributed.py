"""Stage 1 on torch.distributed for real: `rellax train rella --nproc 2` launches torchrun, two gloo
processes train a tiny random Llama on real ML-100K prompts.

What must hold: 2 processes at per-process batch b take the optimizer steps 1 process takes at batch
2b (the same examples per step; only the order gradients are summed in differs, so the adapters
agree to float32 rounding compounded over a few Adam steps); a killed rank ends the run with an
error naming it, never a hang; a checkpoint is resumed only by the world size that wrote it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Adapters after 4 Adam steps at lr 1e-2: float32 sums in another order move the 7th digit of each
# gradient, and Adam's normalisation can carry that to ~1e-6 of a weight; 1e-4 still catches a rank
# that trained on the wrong examples or a gradient not averaged (both move weights by ~1e-2).
ADAPTER_ATOL = 1e-4


def _cli(*args: str | Path, nproc: int = 1) -> list[str]:
    cmd = [sys.executable, "-m", "cli", "train", "rella", *map(str, args)]
    return [*cmd, "--nproc", str(nproc)] if nproc > 1 else cmd


def _common(tiny_model_dir: Path, root: Path, epochs: int = 2) -> list[str | Path]:
    return [
        "--model-dir", tiny_model_dir, "--index-dir", root / "index", "--n-rows", "8", "--k", "5",
        "--epochs", str(epochs), "--micro-batch", "2", "--valid-rows", "32", "--lr", "1e-2", "--fp32",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    # One BLAS thread per process: two processes on two cores, and the same kernels in both runs.
    return {**os.environ, "OMP_NUM_THREADS": "1", "RELLAX_DIST_TIMEOUT_S": "120"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    one = subprocess.run(
        _cli(*_common(tiny_model_dir, root), "--batch-size", "8", "--out", root / "one"),
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        _cli(*_common(tiny_model_dir, root), "--batch-size", "4", "--out", root / "two", nproc=2),
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    return {"root": root, "one": root / "one", "two": root / "two"}


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_two_processes_at_batch_b_train_as_one_at_batch_2b(runs: dict[str, Path]) -> None:
    one, two = _metrics(runs["one"])["result"], _metrics(runs["two"])["result"]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["steps"] == two["steps"] == 4 and one["examples"] == two["examples"] == 32
    a = load_file(runs["one"] / "adapter" / "adapter_model.safetensors")
    b = load_file(runs["two"] / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < ADAPTER_ATOL, worst
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 100 * ADAPTER_ATOL  # B trained
    assert two["best_valid_auc"] == pytest.approx(one["best_valid_auc"], abs=1e-3)
    assert [p["step"] for p in two["curve"]] == [p["step"] for p in one["curve"]]


def test_only_rank_zero_writes_the_run(runs: dict[str, Path]) -> None:
    """One metrics file, one curve, one checkpoint; its result printed once, as JSON."""
    names = sorted(p.name for p in runs["two"].iterdir())
    assert {"adapter", "metrics.json", "checkpoint.pt", "curve.json"} <= set(names)
    assert not [n for n in names if n.endswith(".tmp")]
    state = torch.load(runs["two"] / "checkpoint.pt", weights_only=True)
    assert state["result"]["world_size"] == 2


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc: no extra dependency)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in env:
        if entry.startswith(b"RANK="):
            return int(entry[5:])
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc to find a rank")
def test_a_killed_rank_fails_the_run_and_a_resume_needs_the_same_world(
    runs: dict[str, Path], tiny_model_dir: Path
) -> None:
    out = runs["root"] / "killed"
    # Many epochs: the run is still training when rank 1 is killed.
    cmd = _cli(*_common(tiny_model_dir, runs["root"], epochs=200), "--batch-size", "4", "--out", out, nproc=2)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint.pt").exists():  # rank 0 writes it after the first step
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.5)
        victims = [p for p in _descendants(proc.pid) if _rank_of(p) == 1]
        assert victims, "no process with RANK=1 under the launcher"
        os.kill(victims[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=180)  # no hang: torchrun stops the survivor
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "ChildFailedError" in stderr or "failed" in stderr.lower(), stderr[-3000:]
    assert "-9" in stderr or "SIGKILL" in stderr, stderr[-3000:]  # torchrun names the signal

    # The checkpoint was written by 2 processes: the same command on 1 refuses it, saying what to do.
    again = subprocess.run(
        _cli(*_common(tiny_model_dir, runs["root"], epochs=200), "--batch-size", "4", "--out", out),
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode != 0
    assert "error: " in again.stderr and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert "written by 2 process(es), this run has 1" in again.stderr, again.stderr[-3000:]


def test_stage2_on_two_processes_matches_one(
    runs: dict[str, Path], tiny_model_dir: Path, din_dir: Path
) -> None:
    """Stage 2 (SPA projector + CFLoRA gates over stage 1, per-example DIN inputs) the same way."""
    root = runs["root"]

    def stage2(out: str, batch: int, nproc: int) -> Path:
        cmd = [
            sys.executable, "-m", "cli", "train", "rellax", "--mode", "rellax", "--stage1", runs["one"],
            "--din-dir", din_dir, "--model-dir", tiny_model_dir, "--index-dir", root / "index",
            "--n-rows", "8", "--k", "5", "--epochs", "1", "--micro-batch", "2", "--valid-rows", "32",
            "--lr", "1e-2", "--fp32", "--batch-size", str(batch), "--out", root / out,
        ]  # fmt: skip
        cmd = [str(c) for c in cmd] + (["--nproc", str(nproc)] if nproc > 1 else [])
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return root / out

    one, two = stage2("s2-one", 8, 1), stage2("s2-two", 4, 2)
    a, b = load_file(one / "stage2.safetensors"), load_file(two / "stage2.safetensors")
    assert a.keys() == b.keys() and any("gate" in k for k in a) and any("spa" in k for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < ADAPTER_ATOL
    assert _metrics(one)["result"]["steps"] == _metrics(two)["result"]["steps"] == 2


def test_fsdp_shards_the_frozen_base_and_trains_as_ddp(runs: dict[str, Path], tiny_model_dir: Path) -> None:
    """`--fsdp`: the frozen decoder layers sharded over 2 processes (FSDP2), the adapter's gradients
    averaged by hand: the same adapter as 1 process at batch 2b, and as DDP."""
    out = runs["root"] / "fsdp"
    done = subprocess.run(
        _cli(*_common(tiny_model_dir, runs["root"]), "--batch-size", "4", "--out", out, "--fsdp", nproc=2),
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(runs["one"] / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < ADAPTER_ATOL
    result = _metrics(out)["result"]
    assert result["world_size"] == 2 and _metrics(out)["config"]["loop"]["fsdp"] is True
    assert result["best_valid_auc"] == pytest.approx(
        _metrics(runs["one"])["result"]["best_valid_auc"], abs=1e-3
    )


def test_a_run_made_with_ddp_is_reused_under_fsdp(runs: dict[str, Path], tiny_model_dir: Path) -> None:
    """How the ranks share the work is not part of a run's identity: the same command with --fsdp
    on a finished DDP run reuses it (no training, the same run id)."""
    before = _metrics(runs["two"])["run_id"]
    done = subprocess.run(
        _cli(*_common(tiny_model_dir, runs["root"]), "--batch-size", "4", "--out", runs["two"], "--fsdp",
             nproc=2),
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already trained" in done.stderr and _metrics(runs["two"])["run_id"] == before
