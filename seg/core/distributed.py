"""Exact statistics across processes: sums, not means of means.

``all_reduce_sum`` with ``grad=True`` is a differentiable all-reduce whose backward sums
the gradients of all ranks: a quantity computed from global sums (BN statistics, Dice's
per-class sums) then has the gradient of the one-process computation once DDP averages
the ranks' gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    # torch.distributed.nn.functional.all_reduce does this but is deprecated, and its
    # suggested replacement (functional collectives) has no backward for all_reduce.
    @staticmethod
    def forward(ctx: object, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for reductions and losses; fp32 and fp64 stay as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (itself with one process)."""
    if world_size() == 1:
        return tensor
    if grad:
        return _AllReduceSum.apply(tensor)
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with batch statistics over all ranks, for the CPU (gloo).

    torch's SyncBatchNorm only runs on GPUs; this gives the CPU the same semantics: mean and
    variance of the whole global batch, running statistics updated with them, gradients
    through the global statistics (their sums are all-reduced differentiably). With one
    process, or in eval mode, it is plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        dtype = x.dtype
        x = at_least_fp32(x)
        channels = x.shape[1]
        local_count = torch.tensor([x.numel() / channels], dtype=x.dtype, device=x.device)
        sums = all_reduce_sum(torch.cat([x.sum((0, 2, 3)), local_count]), grad=True)
        count = sums[-1].detach()
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(count)} over all ranks")
        mean = sums[:channels] / count
        centered = x - mean.view(1, -1, 1, 1)
        # Two passes, not E[x^2] - E[x]^2: on small maps (ASPP's pooled 1x1 branch) the
        # one-pass variance cancels catastrophically in fp32.
        var = all_reduce_sum((centered * centered).sum((0, 2, 3)), grad=True) / count
        with torch.no_grad():
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
            self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
            self.running_var.mul_(1 - momentum).add_(momentum * var.detach() * count / (count - 1))
            self.num_batches_tracked.add_(1)
        out = centered * torch.rsqrt(var.view(1, -1, 1, 1) + self.eps)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(dtype)


def convert_sync_batchnorm(model: nn.Module, cuda: bool) -> nn.Module:
    """Every BatchNorm2d becomes torch's SyncBatchNorm on CUDA, CPUSyncBatchNorm on the CPU."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            reference = child.running_mean if child.running_mean is not None else child.weight
            sync = CPUSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                device=reference.device, dtype=reference.dtype,
            )  # fmt: skip
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync)
        else:
            convert_sync_batchnorm(child, cuda)
    return model
