"""The process group of kvlab.tp: join the one torchrun describes, or spawn local ranks on a free port.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends are set before the group starts).
"""
from dataclasses import dataclass
from datetime import timedelta
import os
import socket

import torch
import torch.distributed as dist

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device
    backend: str

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, obj) -> list | None:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: float = 120.0) -> Dist:
    """Join the group torchrun (or spawn) described in the environment, or form a group of one.
    device: "cuda" (GPU = LOCAL_RANK modulo the GPUs there are), "cpu" or "auto" (cuda when there is one);
    backend: "nccl" (one rank per GPU), "gloo" (CPU, or several ranks sharing GPUs) or "auto" (nccl on GPU)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"backend must be 'auto', 'nccl' or 'gloo', got {backend!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' asked for, but torch sees no CUDA GPU")
    backend = backend if backend != "auto" else "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise ValueError("the nccl backend needs device='cuda'")
    os.environ.update(NO_MULTICAST)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    local = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        import numba
        dev = torch.device("cpu")
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(threads)                 # ranks share the cores
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Dist(dist.get_rank(), dist.get_world_size(), dev, backend)


def _spawned(rank: int, world: int, port: int, results, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    value = fn(*args)
    if rank == 0:
        results.put(value)


def spawn(nproc: int, fn, *args):
    """Run fn(*args) in nproc fresh local processes that form one group; rank 0's return value.
    A failing rank stops the others and re-raises here (torch.multiprocessing's ProcessContext)."""
    import torch.multiprocessing as mp
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}")
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_spawned, args=(nproc, free_port(), results, fn, args), nprocs=nproc, join=True,
                       start_method="spawn")
    return results.get()
