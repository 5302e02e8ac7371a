"""AC-Norm with batch statistics shared by the processes of a group: ``SyncACNorm``.

3D medical networks train with one or two volumes per GPU, too few for stable
per-GPU statistics; as ``nn.SyncBatchNorm`` does for BatchNorm, ``SyncACNorm``
normalises with the statistics of the whole distributed batch, through
``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

In training, each process computes its per-channel moments (count, centre,
mean, M2) with its backend's kernels, one ``all_gather`` collects them, and
every process merges them in rank order (:func:`acnorm_fused.statistics.merge_moments`,
exact for uneven and empty batches) and normalises its own slice with the
result. The backward sums ``dy`` and ``dy * (x - mean)`` locally and
``all_reduce``\\ s the two rows: each process gets the input gradient of its
slice and the target-affine gradient of its slice, which DDP then averages
like any other parameter gradient. The running statistics are updated from
the merged statistics, identically on every process. Eval mode, a process
group of one, or no initialised process group: plain AC-Norm.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._checks import check_finite_affines
from .backends import fused_backend
from .backends.config import StepConfig
from .correlation import as_dtype, stack_affines
from .functional import _dense_layout, checked_backend, effective_momentum
from .modules import ACNorm
from .statistics import merge_moments

__all__ = ["SyncACNorm", "sync_ac_norm", "shares_statistics"]


def shares_statistics(process_group: Any = None) -> bool:
    """Whether a training call would share statistics: an initialised process
    group (the default one when ``None``) of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def _all_gather(tensor: Tensor, group: Any) -> Tensor:
    """``(world, *tensor.shape)``: every process's ``tensor``, in rank order."""
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor.contiguous(), group=group)
    return torch.stack(gathered)


class _SyncACNormFunction(torch.autograd.Function):
    """Training forward and backward of AC-Norm over the batches of a process group."""

    @staticmethod
    def forward(ctx, x, weight_target, bias_target, affines, running_mean, running_var,
                momentum, eps, temperature, activation, negative_slope,
                backend: ModuleType, group, caller):
        count, centre, mean_rel, m2 = merge_moments(_all_gather(backend.local_statistics(x), group))
        total = float(count[0])  # every channel holds the same number of values
        if total <= 1:
            raise ValueError(
                f"{caller}: expected more than 1 value per channel over all processes when "
                f"training, got {int(total)} (input of shape {tuple(x.shape)} on this one)"
            )
        config = StepConfig(True, momentum, eps, temperature, activation, negative_slope)
        out, mean, invstd, new_mean, new_var, aux = backend.forward_with_statistics(
            x, affines, centre, mean_rel, m2 / total, total, running_mean, running_var, config,
        )
        ctx.save_for_backward(x, mean, invstd, aux)
        ctx.config = (backend, group, total, config, weight_target.dtype)
        ctx.mark_non_differentiable(new_mean, new_var)
        return out, new_mean, new_var

    @staticmethod
    def backward(ctx, grad_out, _grad_new_mean, _grad_new_var):
        x, mean, invstd, aux = ctx.saved_tensors
        backend, group, total, config, param_dtype = ctx.config
        local_sums = backend.grad_sums(grad_out, x, mean, invstd, aux, config)
        global_sums = local_sums.clone()
        dist.all_reduce(global_sums, group=group)
        grad_x, grad_target = backend.backward_with_sums(
            grad_out, x, mean, invstd, aux, local_sums, global_sums, total, config,
        )
        grad_target = as_dtype(grad_target, param_dtype)
        needs = ctx.needs_input_grad
        return (
            grad_x if needs[0] else None,
            grad_target[0] if needs[1] else None,
            grad_target[1] if needs[2] else None,
        ) + (None,) * (len(needs) - 3)


def sync_ac_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    weight_target: Tensor,
    bias_target: Tensor,
    momentum: float = 0.1,
    eps: float = 1e-5,
    temperature: float = 1.0,
    activation: str | None = None,
    negative_slope: float = 0.01,
    backend: str = "auto",
    process_group: Any = None,
    *,
    double_update: bool = True,
    caller: str = "sync_ac_norm",
) -> Tensor:
    """Training-mode :func:`acnorm_fused.ac_norm` with the batch statistics of every
    process of ``process_group`` (the default group when ``None``).

    Every process of the group must call it, in the same order, as for any
    collective; this process's batch may be empty. The running statistics
    (when given) move identically on every process: twice per call with
    ``momentum`` by default, once with ``double_update=False``.
    """
    name = checked_backend(
        x, running_mean, running_var, weight, bias, weight_target, bias_target, True, momentum, eps,
        temperature, activation, negative_slope, backend, caller, synced=True)
    if name == "reference":
        raise ValueError(
            f"{caller}: the reference backend cannot share statistics between processes; "
            "use backend 'auto', 'torch', 'triton' or 'cuda'"
        )
    affines = stack_affines(weight, bias, weight_target, bias_target)
    check_finite_affines(caller, affines)
    out, new_mean, new_var = _SyncACNormFunction.apply(
        _dense_layout(x), weight_target, bias_target, affines, running_mean, running_var,
        effective_momentum(momentum, double_update), eps, temperature, activation or "",
        negative_slope, fused_backend(name), process_group, caller,
    )
    if running_mean is not None:
        assert running_var is not None  # given together (checked_backend)
        with torch.no_grad():
            torch._foreach_copy_([running_mean, running_var], [new_mean, new_var])
    return out


class SyncACNorm(ACNorm):
    """AC-Norm whose training statistics cover the batches of all processes of a
    group, for DDP finetuning (the counterpart of ``nn.SyncBatchNorm``).

    Takes an input of any rank from 2 to 5. Arguments as
    :class:`acnorm_fused.ACNorm3d`, plus ``process_group`` (the default group
    when ``None``). Outside training, with a group of one process, or without
    an initialised process group it is plain AC-Norm. The ``reference``
    backend does not share statistics.
    """

    def __init__(self, num_features: int, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and shares_statistics(self.process_group)):
            return super().forward(x)
        self._check_input_dim(x)
        momentum, double_update = self._update_rule()
        out = sync_ac_norm(
            x,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.weight,
            self.bias,
            self.weight_target,
            self.bias_target,
            momentum=momentum,
            process_group=self.process_group,
            double_update=double_update,
            **self._op_options(),
        )
        if self.track_running_stats:
            assert self.num_batches_tracked is not None  # registered with track_running_stats
            self.num_batches_tracked.add_(1)
        return out
