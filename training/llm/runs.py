"""Run directories that know what they were trained with: reuse a finished run only when the
requested config is the one it ran with, and never resume a checkpoint written under another.

Without this, `rellax demo-build --n-rows 512` would silently return the 256-row run sitting in the
same folder, and a killed run restarted with a new learning rate would resume the old optimizer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rellax.logs import get_logger
from training.llm import distributed

__all__ = ["canonical", "finished_run", "keep_weights", "restore_weights", "start_run", "train_or_reuse"]

log = get_logger(__name__)

_CONFIG = "run_config.json"
# Loop settings that do not change the trained run (FSDP and DDP train the same weights, tested):
# a run made one way is reused the other way, and runs made before such a setting existed keep
# their key.
NOT_IN_KEY = frozenset({"fsdp"})


def canonical(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as JSON reads it back (tuples -> lists, Paths -> str), so saved == requested."""
    return json.loads(json.dumps(config, default=str, sort_keys=True))


def finished_run(out: Path, config: Mapping[str, Any], outputs: Sequence[str]) -> dict[str, Any] | None:
    """The finished run's metrics.json when `out` holds `outputs` made with exactly `config` (what
    `start_run` recorded: the stage config plus anything else the run depends on)."""
    metrics, recorded = out / "metrics.json", out / _CONFIG
    if not metrics.exists() or not all((out / name).exists() for name in outputs):
        return None
    if not recorded.exists() or canonical(json.loads(recorded.read_text())) != canonical(config):
        log.info("finished run has another config; retraining", out=str(out))
        return None
    return json.loads(metrics.read_text())


def start_run(out: Path, config: Mapping[str, Any], stale: Sequence[str], fresh: bool = False) -> None:
    """Record `config` in `out`; a checkpoint and outputs (`stale`) left by another config go, and
    so do those of the same config when `fresh` (a forced retrain starts from step 0)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / _CONFIG
    other = path.exists() and canonical(json.loads(path.read_text())) != canonical(config)
    if other or fresh:
        log.warning("discarding the run dir's checkpoint", out=str(out), other_config=bool(other))
        for name in ("checkpoint.pt", "curve.json", "metrics.json", *stale):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    path.write_text(json.dumps(canonical(config), indent=2))


def train_or_reuse(
    recipe: Any,
    cfg: Any,
    key: Mapping[str, Any],
    outputs: Sequence[str],
    stale: Sequence[str],
    *,
    force: bool,
    deadline: float | None,
    fit_budget_s: float | None,
) -> dict[str, Any]:
    """What every stage's `main` does: return the finished run in `cfg.out` made with `key` (and the
    training budget, when there is one: a budget-cut run is another run), else record the key, set
    `recipe` up and train it (resuming its checkpoint) and return what its `save` wrote."""
    key = dict(key) if fit_budget_s is None else {**key, "fit_budget_s": fit_budget_s}
    if isinstance(key.get("loop"), Mapping):  # how the ranks share the work is not what is trained
        key["loop"] = {k: v for k, v in key["loop"].items() if k not in NOT_IN_KEY}
    distributed.init()  # under torchrun: join the group; else one process, rank 0 of 1
    if not force and (done := finished_run(cfg.out, key, outputs)) is not None:
        log.info("already trained", out=str(cfg.out))
        return done
    distributed.barrier()  # every rank has read the run folder before rank 0 changes it
    with distributed.main_first():  # rank 0 builds what is shared (model, index, run folder) first
        if distributed.is_main():
            start_run(cfg.out, key, stale=stale, fresh=force)
        recipe.setup(cfg)
    result = recipe.train(deadline, fit_budget_s)
    metrics = recipe.save(result) if distributed.is_main() else None
    distributed.barrier()  # the others return what rank 0 wrote
    return metrics if metrics is not None else json.loads((cfg.out / "metrics.json").read_text())


# What a finished run's run folder must hold for another step (or the bundle) to build on it.
WEIGHTS: dict[int, tuple[str, ...]] = {
    1: ("metrics.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"),
    2: ("metrics.json", "stage2.safetensors", "gbar.safetensors"),
}
MAX_WEIGHTS_BYTES = 10 * 2**20  # the most a committed run's trainable weights may take


def keep_weights(src: Path, dst: Path, stage: int) -> str:
    """Copy a finished run's trainable weights from its folder `src` to `dst` (committed under
    docs/results/, so later steps build on them on any machine); returns the dtype they are kept in.

    fp32 when they fit in MAX_WEIGHTS_BYTES, else fp16 (half the bytes; 11 significant bits, a
    relative rounding of at most 4.9e-4, where bf16 would round 8x coarser): stage 2 with its
    CFLoRA gates on every q/v layer holds ~3.3M parameters, 13 MB in fp32. A restored run loads
    them back into its fp32 modules.
    """
    from safetensors.torch import load_file, save_file

    files = [name for name in WEIGHTS[stage] if (src / name).exists()]  # no gates: no gbar
    size = sum((src / name).stat().st_size for name in files)
    dtype = "float32" if size <= MAX_WEIGHTS_BYTES else "float16"
    shutil.rmtree(dst, ignore_errors=True)
    for name in files:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        if dtype == "float16" and name.endswith(".safetensors"):
            tensors = {k: v.half().contiguous() for k, v in load_file(src / name).items()}
            save_file(tensors, dst / name)
        else:
            shutil.copy2(src / name, dst / name)
    kept = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    if kept > MAX_WEIGHTS_BYTES:
        shutil.rmtree(dst)
        raise ValueError(f"{src.name}: {kept / 2**20:.1f} MB of weights even in fp16 (10 MB kept)")
    return dtype


def restore_weights(run_dir: Path, kept: Path, stage: int) -> bool:
    """Make `run_dir` hold a finished run's weights (copied back from `kept` when the cache lost
    them); False when neither place has them."""
    needed = WEIGHTS[stage][:2]
    if all((run_dir / name).exists() for name in needed):
        return True
    if not all((kept / name).exists() for name in needed):
        return False
    for name in WEIGHTS[stage]:
        if (kept / name).exists():
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(kept / name, run_dir / name)
    log.info("restored a run's weights", run=str(run_dir), source=str(kept))
    return True
