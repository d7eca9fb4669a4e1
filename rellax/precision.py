"""Numeric precision of the frozen LLM: one bf16 recipe for training, indexing and serving, and
which dtype scores are served and evaluated in.

bf16 matmul is about 2x (AVX-512-BF16) to several times (AMX) faster than fp32 on CPUs with native
bf16, but bf16 keeps 8 mantissa bits. Casting the whole model (`model.to(bfloat16)`) also rounds the
residual stream, the norms and the final hidden state at every layer, and that compounds. The bf16
recipe here puts in bf16 only what carries the FLOPs, the decoder's linear weights, and keeps the
token embeddings, every norm, the residual stream, the head and the small trained modules (CFLoRA
A/B and gates, the SPA projector) in fp32. `compute` runs the forward under autocast, so each bf16
linear casts its own input and its output re-enters the fp32 residual stream.

Measured on SmolLM2-135M (12 candidates, K=15 recency prompts, 2-core AMD EPYC with AVX-512-BF16):
max |P(yes) bf16 - fp32| was 0.033 for the whole-model cast and 0.0098 for this recipe (mean 0.010
vs 0.0048). The rest is spread over every matmul: rounding only the linear weights to bf16 moved
P(yes) by up to 0.008, only their inputs by 0.009; keeping the attention, the MLP, the first or the
last 6 layers in fp32 each left the maximum at 0.0095-0.0115. On the trained demo bundle over 2,000
test rows the recipe moved P(yes) by up to 0.028 and AUC by -0.0012 [-0.0062, +0.0040]
(benchmarks/results/precision.md). No part-wise fp32 reaches the 0.005 P(yes) (and 0.001 AUC) the
service promises, so scores are *served and evaluated in fp32* unless bf16 is asked
for (`resolve`); bf16 stays where only speed matters and the result is recorded (training's
frozen base, the item index) and as an opt-in for throughput (RELLAX_DTYPE=bfloat16).

fp16 runs the same recipe with fp16 linear weights. Its 11 significant bits (bf16: 8) are what the
error needed: on the same SmolLM2 prompts max |P(yes) fp16 - fp32| was 0.0011 (bf16: 0.012), inside
the contract (benchmarks/results/precision.md has the trained bundle's AUC). Its range (max 65504)
is enough here because only the linears' inputs and outputs are fp16, never the residual stream.
It is an opt-in (RELLAX_DTYPE=float16) rather than auto because its speed depends on the CPU: on a
CPU without AMX-FP16 it ran at about fp32's speed.

Every path that picks a dtype by itself records `name(dtype)` in its output.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "DTYPES",
    "cast_for_compute",
    "compute",
    "compute_dtype",
    "cpu_model",
    "cpu_supports_bf16",
    "cpu_supports_fp16",
    "name",
    "resolve",
    "resolve_dtype",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_TRAINED = frozenset({"lora_A", "lora_B", "gate"})  # CFLoRA's / peft's small modules: their own dtype
_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
_FP16_CPU_FLAGS = frozenset({"amx_fp16", "avx512_fp16"})


@functools.cache
def _cpu_info() -> tuple[str, frozenset[str]] | None:
    """(model name, flags) from /proc/cpuinfo; None where there is none (not Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    name = next((ln.partition(":")[2].strip() for ln in lines if ln.startswith("model name")), "")
    flags = next((ln.partition(":")[2].split() for ln in lines if ln.startswith("flags")), [])
    return name, frozenset(flags)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AMX or AVX-512-BF16), where bf16 is several times
    faster than fp32; elsewhere bf16 is emulated and slower, so fp32 is the better default."""
    info = _cpu_info()
    return info is not None and bool(_BF16_CPU_FLAGS & info[1])


def cpu_supports_fp16() -> bool:
    """True when the CPU has native fp16 arithmetic (AVX-512-FP16, AMX-FP16); elsewhere fp16 matmul
    is emulated. Used to decide what a benchmark can measure, not what is served."""
    info = _cpu_info()
    return info is not None and bool(_FP16_CPU_FLAGS & info[1])


def cpu_model() -> str:
    """The CPU's model name and its native-bf16 flags ("Intel(R) Xeon(R) Processor [amx_bf16
    avx512_bf16]"): results record it because the same code runs several times faster, and in
    another dtype, on one kind of 2-core machine than on another."""
    info = _cpu_info()
    if info is None:  # not Linux
        return platform.processor() or platform.machine()
    name, flags = info
    bf16 = sorted(_BF16_CPU_FLAGS & flags)
    return f"{name or platform.machine()} [{' '.join(bf16) or 'no native bf16'}]"


def resolve_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """The compute dtype `None` stands for on `device`: bf16 where the hardware has it, else fp32."""
    if dtype is not None:
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.float32


def resolve(dtype: str | None) -> torch.dtype:
    """The dtype scores are served (RELLAX_DTYPE) and evaluated (`rellax eval --dtype`) in:
    "auto"/None = fp32, the reference (bf16 misses the 0.005 P(yes) contract, see above); or a
    name from DTYPES."""
    if dtype in (None, "auto"):
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return DTYPES[dtype]


def name(dtype: torch.dtype) -> str:
    """ "float32" / "bfloat16": how outputs record the dtype they were computed in."""
    return str(dtype).removeprefix("torch.")


def _base_linears(lm: nn.Module) -> Iterator[nn.Linear]:
    """The decoder's own linear layers (q/k/v/o, gate/up/down), not CFLoRA's trained modules."""
    body = getattr(lm, "model", lm)
    for module_name, module in body.named_modules():
        if isinstance(module, nn.Linear) and _TRAINED.isdisjoint(module_name.split(".")):
            yield module


def cast_for_compute(lm: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Put `lm` in the recipe for `dtype`, in place: fp32 casts everything to fp32; bf16 and fp16
    cast the decoder's linear weights only (see the module docstring). Returns `lm`."""
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported compute dtype {dtype}")
    lm.to(torch.float32)
    if dtype != torch.float32:
        for linear in _base_linears(lm):
            linear.to(dtype)
    return lm


def compute_dtype(lm: nn.Module) -> torch.dtype:
    """The dtype `lm`'s decoder matmuls run in (that of its linear weights)."""
    for linear in _base_linears(lm):
        return linear.weight.dtype
    return next(lm.parameters()).dtype


def compute(lm: nn.Module) -> contextlib.AbstractContextManager:
    """The context a forward of `lm` runs in: autocast to `compute_dtype(lm)` when that is not fp32,
    so its bf16 linears take the fp32 residual stream as input; a no-op for fp32."""
    dtype = compute_dtype(lm)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(next(lm.parameters()).device.type, dtype=dtype)
