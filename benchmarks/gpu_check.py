"""GPU check: vLLM against transformers on the same device, same token ids.

    python benchmarks/gpu_check.py [--candidates 64] [--ks 15 30] [--out benchmarks/results]
    python benchmarks/gpu_check.py --tiny --candidates 4 --ks 5 --out /tmp/x   # the CPU dry run

For each K: one ML-100K user's recency prompts for `--candidates` candidates (benchmarks/scoring.py's
workload), scored by
  (t) transformers, all candidates in one left-padded batch, attention mask, `logits_to_keep=1`;
  (v) the service's vLLM backend (`service.backends.vllm_backend.VllmBackend`, prompts as embeddings);
both on the base SmolLM2 with the soft tokens added (placeholders read as plain tokens, so both see
the same ids), in the device's fast dtype (bf16 on a GPU that has it, fp32 on a CPU). Reported:
candidates/s of each (best of 3 after a warm-up), vLLM's speed-up, and max |P(yes) vLLM - transformers|.
`--tiny` swaps in a tiny random Llama and synthetic prompts, so `scripts/gpu_check.sh --dry-run`
runs every step on a CPU in seconds (tests/vllm/test_gpu_check.py) and the script does not rot.
Writes gpu_check.json and gpu_check.md under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_io import save  # noqa: E402
from scoring import careful  # noqa: E402  (transformers batched, left-padded: the same as scoring.py's (b))

from rellax.model_input import ModelInput  # noqa: E402
from rellax.precision import cpu_model  # noqa: E402
from rellax.prompt import Prompt, build_prompt  # noqa: E402
from rellax.tokens import add_soft_tokens, answer_token_ids  # noqa: E402
from training.tables import markdown_table  # noqa: E402


def model_dir(tiny: bool, out: Path) -> Path:
    """A checkpoint vLLM and transformers both load: SmolLM2 (or a tiny random Llama) + soft tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rellax.assets import prepare_model, prepare_tokenizer

    folder = out / ("gpu-check-tiny" if tiny else "gpu-check-smollm2")
    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(prepare_tokenizer() if tiny else prepare_model())
    if tiny:  # head size 32: vLLM's CPU attention needs >= 32
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
            initializer_range=0.3, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(prepare_model(), dtype=torch.float32)
    add_soft_tokens(tokenizer, model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompts_for(tokenizer, tiny: bool, candidates: int, ks: list[int]) -> dict[int, list[Prompt]]:  # noqa: ANN001
    if not tiny:
        from scoring import workload

        return workload(tokenizer, candidates, ks)[1]
    from rellax.entities import Item, Profile

    history = [(Item(i, f"Movie {i}" + " extra" * (i % 3), "Drama"), float(1 + i % 5)) for i in range(1, 40)]
    return {
        k: [
            build_prompt(
                tokenizer,
                Profile(),
                history,
                Item(100 + c, f"Target {c}", "Comedy"),
                k=k,
                mode="recency",
                spa=True,
            )  # fmt: skip
            for c in range(candidates)
        ]
        for k in ks
    }


def best_rate(fn, n: int, repeats: int = 3) -> tuple[float, np.ndarray]:  # noqa: ANN001
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return n / best, out  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[15, 30])
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama, synthetic prompts (dry run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.backends.vllm_backend import VllmBackend

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    folder = model_dir(args.tiny, args.out / "models")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    yes, no = answer_token_ids(tokenizer)
    prompts = prompts_for(tokenizer, args.tiny, args.candidates, args.ks)
    longest = max(len(p.input_ids) for ps in prompts.values() for p in ps)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    backend = VllmBackend(
        folder, yes_id=yes, no_id=no, dtype=dtype_name, max_model_len=longest + 8,
        kv_cache_memory_bytes=(2 << 30) if cuda else (256 << 20),
    )  # fmt: skip
    asyncio.run(backend.start())
    rows = []
    pad = tokenizer.pad_token_id or 0
    try:
        for k in args.ks:
            ps = prompts[k]
            inputs = [ModelInput(input_ids=p.input_ids) for p in ps]
            t_rate, t_p = best_rate(lambda ps=ps: careful(hf, ps, yes, no, pad), len(ps))
            v_rate, v_p = best_rate(lambda inputs=inputs: asyncio.run(backend.score(inputs)), len(ps))
            rows.append(
                {
                    "K": k,
                    "candidates": len(ps),
                    "mean_tokens": round(float(np.mean([len(p.input_ids) for p in ps])), 1),
                    "transformers_cand_per_s": round(t_rate, 2),
                    "vllm_cand_per_s": round(v_rate, 2),
                    "vllm_speedup": round(v_rate / t_rate, 2),
                    "max_abs_dp": float(np.abs(np.asarray(v_p) - np.asarray(t_p)).max()),
                }
            )
            print(rows[-1], flush=True)
    finally:
        asyncio.run(backend.close())
    device_name = torch.cuda.get_device_name(0) if cuda else cpu_model()
    result = {
        "device": str(device),
        "device_name": device_name,
        "dtype": dtype_name,
        "model": "tiny random Llama (dry run)" if args.tiny else "SmolLM2-135M-Instruct + soft tokens",
        "dry_run": bool(args.tiny),
        "rows": rows,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    lines = [
        f"GPU check on {device_name} ({device}, {dtype_name}); model: {result['model']}.",
        "",
        markdown_table(
            ("K", "candidates", "mean tokens", "transformers cand/s", "vLLM cand/s", "vLLM speed-up",
             "max abs dP"),
            [
                (r["K"], r["candidates"], r["mean_tokens"], r["transformers_cand_per_s"],
                 r["vllm_cand_per_s"], f"{r['vllm_speedup']}x", f"{r['max_abs_dp']:.2e}")
                for r in rows
            ],
            align="rrrrrrr",
        ),
    ]  # fmt: skip
    save(args.out, "gpu_check", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
