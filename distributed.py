"""Data-parallel training under torchrun: the process group and the few collectives the
benchmark needs. A plain `python benchmark.py` (no WORLD_SIZE, or WORLD_SIZE=1) creates no
process group, and every helper here is then the identity, so its numbers do not change.

    torchrun --standalone --nproc_per_node 2 benchmark.py ...          # one machine
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:PORT benchmark.py ...                 # on every machine

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
the backend follows the device: NCCL on CUDA (each rank on cuda:LOCAL_RANK), gloo on CPU.
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0
# What a collective raises when another rank died or cannot be reached (all RuntimeErrors).
PEER_ERRORS = tuple(getattr(dist, n) for n in ("DistError", "DistBackendError", "DistNetworkError",
                                               "DistStoreError") if hasattr(dist, n))

_device: torch.device | None = None  # where collectives put their tensors (NCCL: the rank's GPU)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def world_size() -> int:
    """Processes in the job (torchrun's WORLD_SIZE); 1 for a plain run. Known before init."""
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def local_world_size() -> int:
    return _env_int("LOCAL_WORLD_SIZE", world_size())


def is_main() -> bool:
    """True on the one process that writes files, logs to wandb and prints progress (rank 0)."""
    return rank() == 0


def active() -> bool:
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def backend() -> str | None:
    return dist.get_backend() if active() else None


def describe() -> dict:
    """What a results record says about the job."""
    return {"world_size": world_size(), "backend": backend()}


def init(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the job's process group (a no-op in a plain run). The timeout bounds how long a
    rank waits in a collective for one that died or hangs, so the job always ends."""
    global _device
    if world_size() == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _device = device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))


def is_peer_failure(e: BaseException) -> bool:
    """A collective failed because another process died, hangs (past the timeout) or cannot
    be reached. gloo raises a plain RuntimeError naming itself for a reset connection."""
    if isinstance(e, PEER_ERRORS):
        return True
    msg = str(e).lower()
    return active() and isinstance(e, RuntimeError) and ("gloo" in msg or "nccl" in msg)


def close() -> None:
    global _device
    if active():
        dist.destroy_process_group()
    _device = None


def barrier() -> None:
    if active():
        dist.barrier()


def all_sum(values: list) -> list:
    """Each value (a number or a tensor) summed over the ranks, in one all-reduce of float64
    (exact for counts below 2**53). Returned as given, untouched, in a plain run."""
    if not active():
        return values
    flat = torch.cat([torch.as_tensor(v, dtype=torch.float64).reshape(-1).to(_device) for v in values])
    dist.all_reduce(flat)
    out, start = [], 0
    for v in values:
        n = v.numel() if isinstance(v, torch.Tensor) else 1
        part = flat[start:start + n]
        start += n
        out.append(part.reshape(v.shape).to(v.device, v.dtype) if isinstance(v, torch.Tensor)
                   else type(v)(part.item()))
    return out


def all_mean(value: float) -> float:
    return all_sum([value])[0] / world_size() if active() else value


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] in a plain run."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_batches(batches: list) -> list:
    """Every rank's batches, back in dataset order, on every rank. The batches must have been
    dealt round-robin: global batch b evaluated on rank b % world_size (data.ShardedBatches)."""
    per_rank = gather_objects(batches)
    total = sum(len(b) for b in per_rank)
    return [per_rank[b % len(per_rank)][b // len(per_rank)] for b in range(total)]


def reseed(seed: int, epoch: int) -> None:
    """Under torchrun, a dropout stream per (seed, epoch, rank): ranks draw different masks,
    and a resumed epoch draws the same ones as an uninterrupted run. A no-op in a plain run
    (its stream continues from the model's seed, as it always did)."""
    if world_size() > 1:
        digest = hashlib.sha256(f"{seed}/{epoch}/{rank()}".encode()).digest()
        torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def data_parallel(model: torch.nn.Module, device: torch.device):
    """The DistributedDataParallel wrapper that averages model's gradients over the
    processes (its parameters are rank 0's from here on); None in a plain run."""
    if not active():
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def launcher() -> list[str]:
    """The start of the command that relaunches this job (for the printed --resume command)."""
    world, local = world_size(), local_world_size()
    if world == 1:
        return ["python"]
    if world == local:
        return ["torchrun", "--standalone", "--nproc_per_node", str(world)]
    return ["torchrun", "--nnodes", str(world // local), "--nproc_per_node", str(local),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "HOST:PORT"]
