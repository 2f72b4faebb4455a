"""Sharding a harvest over processes with torch.distributed (``torchrun``), merged exactly.

The contexts are cut into the batches a single process would run (``batch_size``
consecutive contexts each) and rank r takes batches ``r, r + P, r + 2P, ...``: every
batch is exactly a single-process batch, so the model and SAE compute bit-identical
values (batch composition can change a matmul's last bits), and the merged result equals
the single-process run exactly, not just within float noise. After the pass every rank sends its
state to rank 0 (point-to-point, one tensor at a time, in a fixed order: no pickling),
and rank 0 merges them: top contexts and samples by their keys, counts by addition. The
keys make the merged state equal to one pass over all contexts (see ``keys``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .state import HarvestState


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def indices(self, n: int, batch_size: int) -> torch.Tensor:
        """Global context indices of this shard, in processing order: the contexts of
        batches ``rank, rank + world_size, ...`` of ``n`` contexts cut in ``batch_size``."""
        starts = range(self.rank * batch_size, n, self.world_size * batch_size)
        parts = [torch.arange(s, min(s + batch_size, n), dtype=torch.int64) for s in starts]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def shard_from_env() -> Shard:
    """The shard ``torchrun`` describes in WORLD_SIZE / RANK / LOCAL_RANK (else 1 process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torch.distributed environment: RANK={rank}, WORLD_SIZE={world}")
    return Shard(rank, world, local)


def init(shard: Shard, device: torch.device | str) -> None:
    """Join the process group (gloo on CPU, nccl on CUDA) unless already in one."""
    if not shard.distributed or (dist.is_available() and dist.is_initialized()):
        return
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=shard.rank, world_size=shard.world_size)


def broadcast_int(value: int, shard: Shard, device: torch.device | str) -> int:
    """Rank 0's integer, on every rank."""
    if not shard.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def all_ok(ok: bool, shard: Shard, device: torch.device | str) -> bool:
    """True on every rank only if it is True on every rank."""
    if not shard.distributed:
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_to_main(state: HarvestState, empty: HarvestState, shard: Shard) -> HarvestState:
    """Rank 0 receives every other rank's state and merges it into its own (returned);
    other ranks send theirs and get their own state back. ``empty``: a fresh state of the
    same shapes, used on rank 0 as the receive buffer."""
    if not shard.distributed:
        return state
    names = sorted(state.tensors())
    device = next(iter(state.tensors().values())).device
    if shard.is_main:
        buffers = empty.tensors()
        for src in range(1, shard.world_size):
            for name in names:
                dist.recv(buffers[name], src=src)
            counters = torch.zeros(3, dtype=torch.int64, device=device)
            dist.recv(counters, src=src)
            empty.contexts_done, empty.tokens_seen, empty.tokens_valid = (
                int(c) for c in counters.tolist()
            )
            state.merge(empty)
        return state
    tensors = state.tensors()
    for name in names:
        dist.send(tensors[name].contiguous(), dst=0)
    c = state.counters()
    dist.send(
        torch.tensor(
            [c["contexts_done"], c["tokens_seen"], c["tokens_valid"]],
            dtype=torch.int64,
            device=device,
        ),
        dst=0,
    )
    return state
