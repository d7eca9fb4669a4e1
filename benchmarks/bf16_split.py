"""Where the bf16 runtime's error comes from, and what removing it costs on this CPU.

    .venv/bin/python benchmarks/bf16_split.py [--candidates 32] [--k 15]

`rellax.precision`'s bf16 recipe keeps norms, softmax, attention, the residual stream and the head
in fp32 and still moves P(yes) by more than the 0.005 the service promises. This benchmark takes
the decoder linears apart, on SmolLM2-135M, one ML-100K user's recency prompts (the scoring
benchmark's workload) and the base model (no adapters):

Whole model (P(yes) of every candidate against fp32, candidates/s), each variant changing only the
decoder linears (q/k/v/o, gate/up/down), everything else fp32:
- `bf16 recipe`: what RELLAX_DTYPE=bfloat16 serves (bf16 weights, autocast: bf16 in, bf16 out);
- `bf16 operands, fp32 out`: oneDNN's bf16 math mode (`torch.backends.mkldnn.matmul.fp32_precision
  = "bf16"`): inputs and weights rounded to bf16, fp32 accumulation and output;
- `weights rounded` / `inputs rounded`: fp32 GEMMs over bf16-rounded weights / inputs only (an
  emulation, to split the operand error in two; not a speed variant);
- `outlier channels in fp32`: weights and inputs rounded as above except the 16 input channels of
  each linear with the largest |x| on these prompts (LLM.int8()'s outlier split, emulated): asks
  whether a few massive activation channels carry the error;
- `fp16 recipe`: what RELLAX_DTYPE=float16 serves (the bf16 recipe with fp16 weights: 11
  significant bits instead of 8), where the CPU has native fp16;
- `bf16x3`: split operands, x*W ~ xh*Wh + xh*Wl + xl*Wh with h/l the bf16 high and low parts, three
  bf16 products summed in fp32 (the main one through oneDNN's bf16 mode for an fp32 output, the two
  corrections as one native bf16 GEMM over [xh | xl]): about fp32's accuracy at 3x bf16's FLOPs.

Per GEMM (the model's linear shapes at the workload's token count): ms and max relative error
against fp64 for fp32, bf16 (bf16 out), bf16 operands with fp32 out, bf16x3 and fp16.

Writes benchmarks/results/bf16_split.json and bf16_split.md. The machine may be shared: the load
average before and after is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_io import save  # noqa: E402

from rellax.model_input import ModelInput  # noqa: E402
from rellax.precision import cpu_model, cpu_supports_bf16, cpu_supports_fp16  # noqa: E402
from rellax.tokens import add_soft_tokens, answer_token_ids  # noqa: E402
from training.tables import markdown_table  # noqa: E402

TARGET_P = 0.005


@contextlib.contextmanager
def onednn_bf16_math() -> Iterator[None]:
    """fp32 matmuls round their operands to bf16 inside oneDNN and keep an fp32 output. The switch
    is process-wide, so it is set only around one call and always restored."""
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous


def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low bf16 parts of an fp32 tensor: t ~ hi + lo to about 16 mantissa bits."""
    hi = t.bfloat16()
    return hi, (t - hi.float()).bfloat16()


class SplitLinear(nn.Module):
    """x*W in three bf16 products (see the module docstring): bf16's speed per product, near fp32's
    accuracy. Written here because no torch CPU op takes bf16 operands to an fp32 output directly."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        hi, lo = split(linear.weight.detach().float())
        self.w_hi = hi.float()  # exact in bf16: oneDNN's bf16 mode rounds it to itself
        self.w_corr = torch.cat([lo, hi], dim=1).contiguous()  # pairs with [xh | xl]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xh, xl = split(x)
        with onednn_bf16_math():
            main = F.linear(x, self.w_hi)
        out = main + F.linear(torch.cat([xh, xl], dim=-1), self.w_corr).float()
        return out if self.bias is None else out + self.bias


class OutlierKeptLinear(nn.Linear):
    """An fp32 linear over bf16-rounded weights and inputs except the `kept` input channels."""

    kept: torch.Tensor  # bool mask over input channels
    rounded_weight: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.where(self.kept, x, x.bfloat16().float()), self.rounded_weight, self.bias)


class RoundedInputLinear(nn.Linear):
    """An fp32 linear whose input is first rounded to bf16: the input half of the operand error."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.bfloat16().float())


def decoder_linears(lm: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    for parent in list(lm.model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                yield parent, child_name, child


def with_split(lm: nn.Module) -> nn.Module:
    for parent, child_name, child in decoder_linears(lm):
        setattr(parent, child_name, SplitLinear(child))
    return lm


def with_rounded_weights(lm: nn.Module) -> nn.Module:
    with torch.no_grad():
        for _, _, child in decoder_linears(lm):
            child.weight.copy_(child.weight.bfloat16().float())
    return lm


def with_rounded_inputs(lm: nn.Module) -> nn.Module:
    for _, _, child in decoder_linears(lm):
        child.__class__ = RoundedInputLinear
    return lm


def input_channel_peaks(base: nn.Module, scorer_for: Callable[[nn.Module], object], texts: list) -> list:
    """Per decoder linear, in `decoder_linears` order: max |input| of each channel over `texts`."""
    linears = [lin for _, _, lin in decoder_linears(base)]
    peaks: list[torch.Tensor | None] = [None] * len(linears)

    def record(index: int, args: tuple) -> None:
        seen = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
        peaks[index] = seen if peaks[index] is None else torch.maximum(peaks[index], seen)

    hooks = [
        lin.register_forward_pre_hook(lambda _m, args, i=i: record(i, args)) for i, lin in enumerate(linears)
    ]
    try:
        scorer_for(base).score(texts)
    finally:
        for hook in hooks:
            hook.remove()
    return peaks


def with_outliers_kept(peaks: list[torch.Tensor], n_kept: int = 16) -> Callable[[nn.Module], nn.Module]:
    def prepare(lm: nn.Module) -> nn.Module:
        with torch.no_grad():
            for (_, _, child), peak in zip(decoder_linears(lm), peaks, strict=True):
                kept = torch.zeros_like(peak, dtype=torch.bool)
                kept[peak.argsort(descending=True)[:n_kept]] = True
                rounded = child.weight.bfloat16().float()
                child.rounded_weight = torch.where(kept, child.weight, rounded)
                child.kept = kept
                child.__class__ = OutlierKeptLinear
        return lm

    return prepare


def whole_model(base: nn.Module, tokenizer, texts: list[ModelInput]) -> list[dict]:  # noqa: ANN001
    """P(yes) error against fp32 and candidates/s of each variant on the same prompts."""
    from rellax.scorer import Scorer, ScoringModel

    yes, no = answer_token_ids(tokenizer)
    peaks = input_channel_peaks(
        copy.deepcopy(base), lambda lm: Scorer(ScoringModel(lm, yes, no), dtype=torch.float32), texts
    )
    variants: dict[str, tuple[Callable[[nn.Module], nn.Module], torch.dtype, bool]] = {
        "fp32 (reference)": (lambda lm: lm, torch.float32, False),
        "bf16 recipe (RELLAX_DTYPE=bfloat16)": (lambda lm: lm, torch.bfloat16, False),
        "bf16 operands, fp32 out (oneDNN bf16 math)": (lambda lm: lm, torch.float32, True),
        "weights rounded to bf16 only (emulated)": (with_rounded_weights, torch.float32, False),
        "inputs rounded to bf16 only (emulated)": (with_rounded_inputs, torch.float32, False),
        "16 outlier input channels per linear in fp32 (emulated)": (
            with_outliers_kept(peaks),
            torch.float32,
            False,
        ),
        "bf16x3 split operands": (with_split, torch.float32, False),
    }
    if cpu_supports_fp16():  # the same recipe with 3 more mantissa bits (emulated, and slow, elsewhere)
        variants["fp16 recipe (RELLAX_DTYPE=float16)"] = (lambda lm: lm, torch.float16, False)
    rows, reference = [], None
    for name, (prepare, dtype, onednn_bf16) in variants.items():
        scorer = Scorer(ScoringModel(prepare(copy.deepcopy(base)), yes, no), dtype=dtype)
        math = onednn_bf16_math if onednn_bf16 else contextlib.nullcontext
        with math():
            scorer.score(texts[:2])  # warm-up
            start = time.perf_counter()
            p = scorer.score(texts)
            rate = len(texts) / (time.perf_counter() - start)
        reference = p if reference is None else reference
        gap = np.abs(p - reference)
        rows.append(
            {
                "variant": name,
                "max_abs_dp": round(float(gap.max()), 5),
                "mean_abs_dp": round(float(gap.mean()), 5),
                "candidates_per_s": round(rate, 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def _ms(fn: Callable[[], torch.Tensor], repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1e3 * (time.perf_counter() - start) / repeats


def per_gemm(base: nn.Module, tokens: int) -> list[dict]:
    """ms and max relative error (vs fp64) of each product kind on the model's linear shapes."""
    shapes = sorted({(lin.in_features, lin.out_features) for _, _, lin in decoder_linears(base)})
    g = torch.Generator().manual_seed(0)
    rows = []
    for k, n in shapes:
        x = torch.randn(tokens, k, generator=g)
        w = torch.randn(n, k, generator=g) / k**0.5
        exact = x.double() @ w.double().T
        split_linear = SplitLinear(_linear(w))
        xb, wb, xh, wh = x.bfloat16(), w.bfloat16(), x.half(), w.half()

        def onednn(x=x, w=w) -> torch.Tensor:
            with onednn_bf16_math():
                return F.linear(x, w)

        kinds = {
            "fp32": lambda x=x, w=w: F.linear(x, w),
            "bf16 (bf16 out)": lambda xb=xb, wb=wb: F.linear(xb, wb),
            "bf16 operands, fp32 out": onednn,
            "bf16x3": lambda x=x, s=split_linear: s(x),
            "fp16": lambda xh=xh, wh=wh: F.linear(xh, wh),
        }
        for name, fn in kinds.items():
            with torch.inference_mode():
                out = fn().double()
                error = float((out - exact).abs().max() / exact.abs().max())
                ms = _ms(fn)
            rows.append({"shape": f"{tokens}x{k} @ {k}x{n}", "kind": name, "ms": round(ms, 2),
                         "max_rel_error": float(f"{error:.2e}")})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def _linear(w: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    return linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if not cpu_supports_bf16():
        print(
            "skipped: this CPU has no native bf16 (amx_bf16 / avx512_bf16), so no bf16 runtime to take apart"
        )
        return

    from scoring import workload
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rellax.assets import prepare_model

    load_before = os.getloadavg()
    started = time.perf_counter()
    path = prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    add_soft_tokens(tokenizer)
    info, prompts = workload(tokenizer, args.candidates, [args.k])
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    add_soft_tokens(tokenizer, base)
    texts = [ModelInput(p.input_ids) for p in prompts[args.k]]  # placeholders as plain tokens
    tokens = sum(len(t.input_ids) for t in texts)
    result = {
        "workload": {**info, "k": args.k, "tokens": tokens},
        "whole_model": whole_model(base, tokenizer, texts),
        "per_gemm": per_gemm(base, tokens),
        "cpu": cpu_model(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    save(args.out, "bf16_split", result, render(result))


def render(result: dict) -> str:
    work = result["workload"]
    model = [
        [r["variant"], f"{r['max_abs_dp']:.5f}", f"{r['mean_abs_dp']:.5f}", f"{r['candidates_per_s']:.2f}"]
        for r in result["whole_model"]
    ]
    gemm = [
        [r["shape"], r["kind"], f"{r['ms']:.1f}", f"{r['max_rel_error']:.1e}"] for r in result["per_gemm"]
    ]
    return "\n".join(
        [
            f"# bf16 error, part by part ({result['cpu']}, {result['torch_threads']} threads, "
            f"load avg {result['load_avg_before'][0]} -> {result['load_avg_after'][0]})",
            "",
            f"SmolLM2-135M base model, user {work['user_id']}, {work['candidates']} candidates, "
            f"K={work['k']} recency prompts ({work['tokens']} tokens). Only the decoder linears change; "
            f"everything else is fp32. Target: max |dP| <= {TARGET_P}.",
            "",
            markdown_table(("variant", "max abs dP", "mean abs dP", "cand/s"), model, align="lrrr"),
            "",
            "Per GEMM, the model's shapes at the workload's token count (max error relative to the "
            "largest exact output, fp64 reference):",
            "",
            markdown_table(("shape", "kind", "ms", "max rel error"), gemm, align="llrr"),
            "",
            f"Wall time {result['wall_s']} s.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
