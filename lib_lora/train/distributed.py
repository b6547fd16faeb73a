"""Data-parallel training over several processes (`torchrun --nproc_per_node N -m lib_lora train ...`).

Every process holds the whole model and the same adapters; each step's batch (the config's
`train_batch_size`, the global batch whatever N, unlike kohya's per-device batch) is cut into N
shares, one per process. Each process draws the random numbers of the whole batch (caption shuffles,
flips, crops, noise, timesteps) and keeps its rows', so the data and noise are those one process
would use. Each process's loss is its rows' sum divided by the whole batch's size, and after
backward the adapters' gradients are summed over the processes (what DDP's all-reduce does): the
gradient of the batch's mean loss. So N processes follow one process's loss curve, and a run saved
with N processes resumes with any other N. Process 0 alone writes the
run folder, the LoRA files and the samples, and reports progress. gloo on CPU, nccl on CUDA.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist



@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: rank of world_size (1 process: rank 0 of 1, every method a no-op)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def rows(self, batch_size: int) -> slice:
        """This process's rows of a batch: equal shares, the first processes one more when it does not divide."""
        return slice(self.rank * batch_size // self.world_size, (self.rank + 1) * batch_size // self.world_size)

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Every process ends with the sum of all processes' gradients (one flattened all-reduce). Each loss was
        divided by the whole batch's size, so the sum is the gradient of the batch's mean loss."""
        if not self.active:
            return
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in parameters]  # an empty share has none
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, g in zip(parameters, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).clone()

    def total(self, value: float) -> float:
        """A number summed over the processes (each process's share of the batch's mean loss)."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor)
        return tensor.item()

    def agree_shape(self, shape: torch.Size) -> torch.Size:
        """The latent shape [C, h, w] of this batch as the processes holding rows of it see it (all share a bucket)."""
        if not self.active:
            return shape
        tensor = torch.tensor(list(shape) if len(shape) == 3 else [0, 0, 0], device=_collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return torch.Size(tensor.tolist())

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on one (an interrupt stops all of them at the same step)."""
        if not self.active:
            return flag
        tensor = torch.tensor([int(flag)], device=_collective_device())
        dist.all_reduce(tensor)
        return bool(tensor.item())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def from_environment() -> Distributed:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT); one process without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return Distributed(dist.get_rank(), dist.get_world_size())


def device_for(distributed: Distributed) -> str | None:
    """This process's GPU under torchrun (cuda:LOCAL_RANK); None lets the host choose (one process)."""
    if distributed.active and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None
