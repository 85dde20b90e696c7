"""Data-parallel training with torch.distributed, started by ``torchrun``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; ``setup`` joins the process group (NCCL on GPUs,
gloo on CPUs) and pins each rank to its GPU. The trainer then wraps the model in
DistributedDataParallel, gives each rank its slice of every global batch, and all-reduces the
numbers it logs, so that a run on N ranks computes what one process with the same global batch
would (``--batch-size`` is the global batch, split across ranks).

BatchNorm: ``--sync-bn`` normalises with the statistics of the whole global batch. On GPUs that is
torch's ``nn.SyncBatchNorm``; it refuses CPU tensors, so on CPUs ``CPUSyncBatchNorm`` below does the
same over gloo, which is what makes a CPU test of the whole path possible.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from cnnlab.core.errors import UserError

TIMEOUT_ENV = "CNNLAB_DIST_TIMEOUT"  # seconds a collective may wait for a silent rank
DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class Group:
    """Where this process stands in the job: rank ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    joined: bool = False  # this call joined the process group (and leaves it in teardown)

    @property
    def main(self) -> bool:
        """Rank 0 writes logs and checkpoints; the others only compute."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Group()


def setup(device: str) -> Group:
    """Join torchrun's process group if this process was started by torchrun, else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if dist.is_initialized():  # joined by a caller (a group of seeds), which also leaves it
        return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise UserError("`device` cuda was asked for but no CUDA GPU is visible; use `device` cpu or auto")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                            "start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout,
                            device_id=torch.device("cuda", local_rank) if use_cuda else None)
    return Group(rank, world, local_rank, joined=True)


def teardown(group: Group) -> None:
    """Leave the process group, if ``setup`` joined it: a process group left and joined again does not
    reconnect under torchrun (gloo's rendezvous keys are taken), so a caller that trains several runs
    joins once around them all."""
    if group.joined and dist.is_initialized():
        dist.destroy_process_group()


def device_for(group: Group, device: torch.device) -> torch.device:
    """Each rank on its own GPU; on CPUs they share the machine."""
    return torch.device("cuda", group.local_rank) if device.type == "cuda" and group.active else device


def shard(x: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's contiguous slice of ``x`` (sizes differ by at most one between ranks)."""
    return x.tensor_split(group.world)[group.rank] if group.active else x


def all_sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    """``x`` summed over all ranks (in place when distributed)."""
    if group.active:
        dist.all_reduce(x)
    return x


def broadcast(value: object, group: Group) -> object:
    """Rank 0's ``value`` on every rank (for choices only rank 0 may make, like a run folder's name)."""
    if not group.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: nn.Module, group: Group, device: torch.device, sync_bn: bool) -> nn.Module:
    """The model to run forward passes with: DistributedDataParallel over ``model`` when distributed.

    ``model`` itself stays unwrapped; it is what checkpoints hold, loadable in one process.
    """
    if not group.active:
        return model
    if sync_bn:
        convert_sync_bn(model, device)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=not sync_bn)


def convert_sync_bn(model: nn.Module, device: torch.device) -> None:
    """Replace every BatchNorm2d of ``model`` in place by a synchronised one with the same state."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, CPUSyncBatchNorm):
            if device.type == "cuda":
                synced = nn.SyncBatchNorm.convert_sync_batchnorm(child)
            else:
                synced = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats)
                # The same parameter and buffer objects, as nn.SyncBatchNorm's conversion keeps them:
                # an optimizer built before the conversion still updates them.
                synced.weight, synced.bias = child.weight, child.bias
                for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                    setattr(synced, buffer, getattr(child, buffer))
            setattr(model, name, synced)
        else:
            convert_sync_bn(child, device)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, all-reduced over gloo.

    It computes what single-process batch norm on the CPU does, the same way: statistics in double
    precision in two passes (mean, then mean squared deviation), then ``x·α + β``; so N ranks match
    one process to float rounding. The all-reduces are differentiable, so gradients flow through the
    shared statistics to every rank.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        wide = x.double()
        count = torch.tensor([x.numel() // c], dtype=torch.float64, device=x.device)
        totals = _AllReduceSum.apply(torch.cat([wide.sum((0, 2, 3)), count]))
        n = totals[c].detach()
        mean = totals[:c] / n
        var = _AllReduceSum.apply((wide - mean.view(1, c, 1, 1)).pow(2).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.float(), factor)
                self.running_var.lerp_((var * n / (n - 1).clamp(min=1)).float(), factor)
        alpha = torch.rsqrt(var + self.eps).float()
        if self.affine:
            alpha = alpha * self.weight
        beta = -mean.float() * alpha
        if self.affine:
            beta = beta + self.bias
        return x * alpha.view(1, c, 1, 1) + beta.view(1, c, 1, 1)


def describe_failure(error: BaseException, group: Group) -> str | None:
    """A one-line account of a collective that failed because another rank went away, else None."""
    if not group.active:
        return None
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    lost = ("connection", "closed", "timed out", "timeout", "broken pipe", "reset by peer", "nccl", "gloo")
    if isinstance(error, (dist.DistError, RuntimeError)) and any(w in text.lower() for w in lost):
        return (f"rank {group.rank} lost contact with the other ranks ({text}); another rank has most likely "
                f"died (see its output above); resume the run with `resume` once all ranks can start")
    return None

