"""The AC-Norm custom operators and their autograd and fake registrations.

``acnorm_fused::ac_norm_fwd`` and ``acnorm_fused::ac_norm_bwd`` are functional
ops (they mutate nothing): the forward returns the updated running statistics
and :func:`acnorm_fused.functional.ac_norm` writes them into the buffers. That
keeps the ops valid for ``torch.compile``, ``opcheck`` and autograd, whichever
fused backend runs underneath.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_finite_parameters
from .backends import fused_backend
from .correlation import compute_dtype

_LIB = "acnorm_fused"


@torch.library.custom_op(f"{_LIB}::ac_norm_fwd", mutates_args=())
def ac_norm_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    weight_target: Tensor,
    bias_target: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_batch_stats: bool,
    momentum: float,
    eps: float,
    temperature: float,
    activation: str,
    negative_slope: float,
    backend: str,
    caller: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward of AC-Norm: ``(out, mean, invstd, new_running_mean, new_running_var)``.

    ``momentum`` is the factor of one update of the running statistics; the
    new running statistics are empty when there is nothing to update.
    """
    check_finite_parameters(
        caller, weight=weight, bias=bias, weight_target=weight_target, bias_target=bias_target
    )
    return fused_backend(backend).forward(
        x, weight, bias, weight_target, bias_target, running_mean, running_var,
        use_batch_stats, momentum, eps, temperature, activation, negative_slope,
    )


@ac_norm_fwd.register_fake
def _(x, weight, bias, weight_target, bias_target, running_mean, running_var,
      use_batch_stats, momentum, eps, temperature, activation, negative_slope, backend, caller):
    stats_dtype = compute_dtype(x.dtype)
    channels = x.shape[1]
    has_update = use_batch_stats and running_mean is not None
    stats_len = channels if has_update else 0
    return (
        torch.empty_like(x),
        x.new_empty((channels,), dtype=stats_dtype),
        x.new_empty((channels,), dtype=stats_dtype),
        x.new_empty((stats_len,), dtype=stats_dtype),
        x.new_empty((stats_len,), dtype=stats_dtype),
    )


@torch.library.custom_op(f"{_LIB}::ac_norm_bwd", mutates_args=())
def ac_norm_bwd(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    weight_target: Tensor,
    bias_target: Tensor,
    mean: Tensor,
    invstd: Tensor,
    use_batch_stats: bool,
    eps: float,
    temperature: float,
    activation: str,
    negative_slope: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of AC-Norm: ``(grad_x, grad_weight_target, grad_bias_target)``."""
    return fused_backend(backend).backward(
        grad_out, x, weight, bias, weight_target, bias_target, mean, invstd,
        use_batch_stats, eps, temperature, activation, negative_slope,
    )


@ac_norm_bwd.register_fake
def _(grad_out, x, weight, bias, weight_target, bias_target, mean, invstd,
      use_batch_stats, eps, temperature, activation, negative_slope, backend):
    return torch.empty_like(x), torch.empty_like(weight_target), torch.empty_like(bias_target)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, weight_target, bias_target, _rm, _rv, use_batch_stats, _momentum,
     eps, temperature, activation, negative_slope, backend, _caller) = inputs
    _out, mean, invstd, _new_mean, _new_var = output
    ctx.save_for_backward(x, weight, bias, weight_target, bias_target, mean, invstd)
    ctx.config = (use_batch_stats, eps, temperature, activation, negative_slope, backend)


def _backward(ctx, grad_out, _grad_mean, _grad_invstd, _grad_new_mean, _grad_new_var):
    x, weight, bias, weight_target, bias_target, mean, invstd = ctx.saved_tensors
    grad_x, grad_weight_target, grad_bias_target = ac_norm_bwd(
        grad_out, x, weight, bias, weight_target, bias_target, mean, invstd, *ctx.config,
    )
    needs = ctx.needs_input_grad
    return (
        grad_x if needs[0] else None,
        None,
        None,
        grad_weight_target if needs[3] else None,
        grad_bias_target if needs[4] else None,
    ) + (None,) * 10


ac_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
