"""The AC-Norm operator: torch.library custom ops, their autograd and fake
registrations, and the eager autograd Function that shares their code.

``acnorm_fused::ac_norm_fwd`` and ``acnorm_fused::ac_norm_bwd`` are functional
ops (they mutate nothing): the forward returns the updated running statistics
and :func:`acnorm_fused.functional.ac_norm` writes them into the buffers. That
keeps them valid for ``torch.compile``, ``torch.export``, ``opcheck`` and
autograd, whichever fused backend runs underneath: torch registers no
autograd formula for an operator that declares a mutation ("Cannot register
autograd formula for non-functional operator", torch 2.13), so the in-place
update is the eager launch plans' (:mod:`acnorm_fused.backends.plan`) alone.

Going through the dispatcher costs a few hundred microseconds of Python per
training step, as much as the whole step of a small layer on a CPU, so eager
calls take :class:`ACNormFunction` instead: the same implementation and the
same autograd formula, without the dispatcher round trips. Traced code
(``torch.compile``, ``torch.export``) always sees the custom ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._checks import check_finite_affines
from .backends import fused_backend
from .backends.config import StepConfig
from .correlation import as_dtype, compute_dtype, stack_affines

_LIB = "acnorm_fused"


def _forward_impl(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward of AC-Norm: ``(out, mean, invstd, new_running_mean, new_running_var, aux)``.

    ``momentum`` is the factor of one update of the running statistics; the
    new running statistics are empty when there is nothing to update. ``aux``
    is whatever the backend keeps for its backward (see its ``aux_like``).
    """
    affines = stack_affines(weight, bias, weight_target, bias_target)
    check_finite_affines(caller, affines)
    config = StepConfig(use_batch_stats, momentum, eps, temperature, activation, negative_slope)
    return fused_backend(backend).forward(x, affines, running_mean, running_var, config)


def _backward_impl(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    aux: Tensor,
    use_batch_stats: bool,
    momentum: float,
    eps: float,
    temperature: float,
    activation: str,
    negative_slope: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Backward of AC-Norm: ``(grad_x, grad_target)``, the latter the ``(2, C)`` rows of
    the gradients of ``weight_target`` and ``bias_target`` in the compute dtype."""
    config = StepConfig(use_batch_stats, momentum, eps, temperature, activation, negative_slope)
    return fused_backend(backend).backward(grad_out, x, mean, invstd, aux, config)


ac_norm_fwd = torch.library.custom_op(f"{_LIB}::ac_norm_fwd", mutates_args=())(_forward_impl)
ac_norm_bwd = torch.library.custom_op(f"{_LIB}::ac_norm_bwd", mutates_args=())(_backward_impl)


@ac_norm_fwd.register_fake
def _(x, weight, bias, weight_target, bias_target, running_mean, running_var,
      use_batch_stats, momentum, eps, temperature, activation, negative_slope, backend, caller):
    stats_dtype = compute_dtype(x.dtype)
    channels = x.shape[1]
    stats_len = channels if (use_batch_stats and running_mean is not None) else 0
    return (
        torch.empty_like(x),
        x.new_empty((channels,), dtype=stats_dtype),
        x.new_empty((channels,), dtype=stats_dtype),
        x.new_empty((stats_len,), dtype=stats_dtype),
        x.new_empty((stats_len,), dtype=stats_dtype),
        fused_backend(backend).aux_like(weight),
    )


@ac_norm_bwd.register_fake
def _(grad_out, x, mean, invstd, aux, use_batch_stats, momentum, eps, temperature, activation,
      negative_slope, backend):
    return torch.empty_like(x), x.new_empty((2, x.shape[1]), dtype=mean.dtype)


# Inputs of ac_norm_fwd that carry gradient: x, weight_target, bias_target.
_X, _WEIGHT_TARGET, _BIAS_TARGET = 0, 3, 4


def _setup_context(ctx, inputs, output) -> None:
    (x, _w, _b, weight_target, _bt, _rm, _rv, *scalars, backend, _caller) = inputs
    _out, mean, invstd, new_mean, new_var, aux = output
    # What the backward reads: the backends keep all they need of the affines in aux.
    ctx.save_for_backward(x, mean, invstd, aux)
    ctx.config = (*scalars, backend)
    ctx.param_dtype = weight_target.dtype
    # Only ``out`` carries gradient; the rest are statistics and saved state.
    ctx.mark_non_differentiable(mean, invstd, new_mean, new_var, aux)
    ctx.set_materialize_grads(False)


def _backward_through(backward_op: Callable[..., tuple[Tensor, Tensor]]):
    """The autograd formula, running the backward kernels through ``backward_op``."""

    def backward(ctx, grad_out, *_grads_of_saved_outputs):
        no_grads = (None,) * len(ctx.needs_input_grad)
        if grad_out is None:
            return no_grads
        grad_x, grad_target = backward_op(grad_out, *ctx.saved_tensors, *ctx.config)
        grad_target = as_dtype(grad_target, ctx.param_dtype)
        needs = ctx.needs_input_grad
        grads: list[Tensor | None] = list(no_grads)
        grads[_X] = grad_x if needs[_X] else None
        grads[_WEIGHT_TARGET] = grad_target[0] if needs[_WEIGHT_TARGET] else None
        grads[_BIAS_TARGET] = grad_target[1] if needs[_BIAS_TARGET] else None
        return tuple(grads)

    return backward


ac_norm_fwd.register_autograd(_backward_through(ac_norm_bwd), setup_context=_setup_context)


class ACNormFunction(torch.autograd.Function):
    """Eager twin of ``acnorm_fused::ac_norm_fwd``: same arguments, outputs and gradients."""

    # The forward takes ctx itself: a separate setup_context would make every
    # apply() bind its arguments through inspect.signature (~0.1 ms).
    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    # The backward kernels are not differentiable: a second derivative is refused, not wrong.
    # once_differentiable's annotations make ctx positional-only, which mypy reads as an
    # override incompatible with Function.backward(ctx, *grad_outputs).
    backward = staticmethod(once_differentiable(_backward_through(_backward_impl)))  # type: ignore[assignment]


def ac_norm_forward(*inputs) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run the AC-Norm forward with autograd: the custom op when traced, else the Function."""
    if torch.compiler.is_compiling():
        return ac_norm_fwd(*inputs)
    return ACNormFunction.apply(*inputs)
