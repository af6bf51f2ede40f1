"""Multi-process (DDP) helpers for ManiDP training.

Launch with ``torchrun --nproc_per_node N -m manidp.train ...`` (or ``manidp-train
--ngpu N``, which spawns the N processes itself).  Every collective here is a
no-op in a single process, so the trainer calls them unconditionally.

What must agree across ranks (docs/DESIGN.md 1.4): gate ``mask_sum`` is summed over
ranks before thresholds are calibrated, per-instance losses are summed (with
their count) before ``L_prev`` is formed, and evaluation counts are summed.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "cleanup", "all_reduce_sum", "all_reduce_mean_",
           "barrier", "assert_same_across_ranks", "gather_batch", "sync_gate_statistics", "average_buffers_", "spawn",
           "env_world_size", "free_port"]


@dataclass
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, its device, whether it is rank 0."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs and checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when a process group with more than one rank is in use."""
        return self.world_size > 1


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> DistEnv:
    """Join the process group torchrun described in the environment (if WORLD_SIZE > 1).

    The backend is NCCL for CUDA devices and gloo otherwise; on CUDA each rank
    takes ``cuda:LOCAL_RANK``.
    """
    world = env_world_size()
    if world <= 1:
        return DistEnv(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistEnv(rank, world, local, device)


def cleanup(env: DistEnv) -> None:
    """Leave the process group (safe to call in a single process)."""
    if env.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op in a single process)."""
    if env.active:
        dist.barrier()


def all_reduce_sum(env: DistEnv, values: Sequence[float]) -> List[float]:
    """Sum a few Python numbers over ranks (float64, so counts stay exact)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device(env))
    if env.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def assert_same_across_ranks(env: DistEnv, values: Sequence[float], what: str) -> None:
    """Raise if ``values`` differ between ranks (a cheap guard on state every rank must share)."""
    if not env.active or not values:
        return
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device(env))
    hi, lo = t.clone(), -t
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX)
    if not torch.equal(hi, -lo):
        raise RuntimeError(f"{what} differ between ranks (rank {env.rank}); this is a bug")


def all_reduce_mean_(env: DistEnv, tensors: Sequence[torch.Tensor]) -> None:
    """Average tensors over ranks in place (one flat all-reduce)."""
    if not env.active or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= env.world_size
    _unflatten_into(flat, tensors)


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` back into ``tensors`` (keeping their dtypes)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
        offset += n


def _comm_device(env: DistEnv) -> torch.device:
    """NCCL needs CUDA tensors; gloo works on CPU ones."""
    return env.device if env.device.type == "cuda" else torch.device("cpu")


def sync_gate_statistics(env: DistEnv, gates: Sequence[torch.nn.Module]) -> None:
    """Sum every gate's ``mask_sum`` over ranks in place, so all ranks calibrate alike."""
    if not env.active or not gates:
        return
    sums = [g.mask_sum for g in gates]
    flat = torch.cat([s.detach().reshape(-1).double() for s in sums]).to(_comm_device(env))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    _unflatten_into(flat.to(sums[0].device), sums)


def average_buffers_(env: DistEnv, model: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks.

    DDP runs with ``broadcast_buffers=False`` (otherwise rank 0 would overwrite
    every rank's ``mask_sum`` on each forward), so the running statistics drift
    apart per rank; averaging them once per epoch gives every rank the same model.
    """
    if not env.active:
        return
    bufs = [b for name, b in model.named_buffers()
            if name.endswith(("running_mean", "running_var")) and b.is_floating_point()]
    all_reduce_mean_(env, bufs)


def gather_batch(env: DistEnv, t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (N, ...) over ranks along dim 0, keeping the autograd graph.

    Used for the manifold similarity loss, which compares every pair of
    instances of the *global* batch, as the original DataParallel code did.
    The backward of the autograd all-gather sums the ranks' gradients for the
    local slice; DDP's gradient averaging then divides by W again, so the
    parameter gradients equal those of a single process on the global batch.
    """
    if not env.active:
        return t
    import warnings
    from torch.distributed.nn.functional import all_gather
    with warnings.catch_warnings():  # deprecated in new torch, but its replacement is not in torch 2.4
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(t.contiguous()), dim=0)


def free_port() -> int:
    """An unused TCP port on localhost for a self-launched process group."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(local_rank: int, world: int, port: int, fn: Callable, args: tuple, out: Optional[str]):
    """Child process body: set torchrun's environment variables, then call ``fn(*args)``."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, torch.get_num_threads() // world))  # share the cores, as torchrun does
    result = fn(*args)
    if out is not None:
        torch.save(result, f"{out}.rank{local_rank}")


def spawn(nprocs: int, fn: Callable, args: tuple = (), result_prefix: Optional[str] = None) -> list:
    """Run ``fn(*args)`` in ``nprocs`` fresh processes forming one process group on localhost.

    ``fn`` must be importable (a module-level function).  With ``result_prefix``
    each rank's return value is saved to ``{result_prefix}.rank{r}`` and the
    list of them is returned.
    """
    import torch.multiprocessing as mp
    port = free_port()
    mp.spawn(_spawn_entry, args=(nprocs, port, fn, args, result_prefix), nprocs=nprocs, join=True)
    if result_prefix is None:
        return []
    return [torch.load(f"{result_prefix}.rank{r}", weights_only=False) for r in range(nprocs)]
