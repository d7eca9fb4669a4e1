"""`scripts/gpu_check.sh --dry-run`: the GPU check's every step on this CPU, so it does not rot
before a GPU is at hand (the vLLM tests it runs, the benchmark, the JSON and markdown it writes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training.tables import table_rows

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.vllm
def test_the_gpu_check_runs_end_to_end_in_its_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert " passed" in (tmp_path / "gpu_check_tests.txt").read_text()
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] is True and result["device"] == "cpu"
    (row,) = result["rows"]
    assert row["K"] == 5 and row["candidates"] == 4
    assert row["vllm_cand_per_s"] > 0 and row["transformers_cand_per_s"] > 0
    # fp32 on both sides, the same ids: the engines agree to float rounding (a wrong position,
    # padding side or answer id moves P(yes) by far more on this wide random model).
    assert row["max_abs_dp"] < 1e-3
    assert table_rows((tmp_path / "gpu_check.md").read_text())[1][:2] == ["5", "4"]


def test_without_a_gpu_the_full_check_says_to_use_the_dry_run(tmp_path: Path) -> None:
    for tool in ("bash", "dirname"):  # what the script needs before its GPU probe; no nvidia-smi
        (tmp_path / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    env = {**os.environ, "PATH": str(tmp_path)}
    done = subprocess.run(
        ["/bin/bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "--dry-run" in done.stderr
