"""torch.distributed for the LLM stages: one process per device, launched by torchrun.

Under `torchrun --nproc-per-node N -m cli train ...` (or `rellax train ... --nproc N`, which
launches torchrun) every process runs the same stage: the same seeded set-up, its own share of each
optimizer step's micro-batches, gradients averaged by DistributedDataParallel (`training.llm.loop`);
or, with `--fsdp`, the frozen decoder layers sharded over the ranks by FSDP2 (`shard_frozen_layers`)
for a model that does not fit one device. Rank 0 alone validates (under FSDP all ranks do, since
every forward is a collective), shows progress, and writes checkpoints, metrics and adapters; the others wait
for it at the next collective. The backend follows the device: gloo on CPU, nccl on GPU. Every
collective has a timeout (`RELLAX_DIST_TIMEOUT_S`, default 1800 s: rank 0's validation runs while
the others wait), so a stuck peer ends the run with an error instead of a hang; a killed rank is
caught sooner by torchrun itself, which stops the others and names the failed rank.

Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op: one process is rank 0 of 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from rellax.logs import get_logger

__all__ = [
    "average_gradients",
    "barrier",
    "broadcast_flags",
    "init",
    "is_main",
    "launch_command",
    "main_first",
    "rank",
    "shard_frozen_layers",
    "under_torchrun",
    "world_size",
]

log = get_logger(__name__)

DEFAULT_TIMEOUT_S = 1800.0


def under_torchrun() -> bool:
    """True in a process torchrun started for a world of more than one."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group torchrun set up (idempotent; a no-op outside torchrun)."""
    if not under_torchrun() or dist.is_initialized():
        return
    timeout = timedelta(seconds=float(os.environ.get("RELLAX_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" = this rank's GPU
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timeout)
    log.info("joined the process group", rank=rank(), world_size=world_size(), backend=backend)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that validates, logs progress and writes files."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (it may build shared files: the converted model, the item
    index, the run folder), then the others run it over what rank 0 left on disk."""
    if world_size() > 1 and not is_main():
        barrier()
    yield
    if world_size() > 1 and is_main():
        barrier()


def broadcast_flags(*flags: bool) -> list[bool]:
    """Rank 0's `flags` on every rank: decisions that depend on a clock (a training budget, a
    session's deadline) must be the same everywhere, or one rank leaves while another waits."""
    if world_size() == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    return [bool(v) for v in t.tolist()]


def shard_frozen_layers(lm: torch.nn.Module, trained: set[torch.nn.Parameter]) -> None:
    """FSDP2 over the decoder layers of `lm` (`lm.model.layers`): each rank holds 1/world of every
    frozen weight and all-gathers a layer for its forward and backward. The trained modules
    (`trained`: LoRA, gates; tiny) are left whole on every rank, as plain parameters, so the
    optimizer, checkpoints and adapter files see them unchanged; `average_gradients` syncs them.
    The embeddings and the head stay whole too (the head is tied to the embeddings)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(lm.parameters()).device
    mesh = init_device_mesh(device.type, (world_size(),))
    for layer in lm.model.layers:
        fully_shard(layer, mesh=mesh, ignored_params=trained)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Mean of each parameter's gradient over the ranks (a parameter no micro-batch used counts 0)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world_size()


def launch_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The torchrun command that runs this CLI call (`argv`, without its --nproc) on `nproc`
    processes on this machine; several machines: run torchrun yourself (README, Scaling out)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "cli", *argv]  # fmt: skip
