"""The ``torch`` backend: AC-Norm as one BatchNorm with the effective affine.

Because both BatchNorms of the authors' formulation normalise with the same
statistics, their sum is one BatchNorm with ``W = (I + S) gamma_t`` and
``B = (I + S) beta_t``. This backend runs exactly that, with ATen's BatchNorm
kernels (and its own statistics pass where ATen's is slow, see below), so it
costs one BatchNorm plus a C x C step. It is the default on CPUs and the model
the fused GPU backends follow.

Both functions are the implementations behind the custom ops in
:mod:`acnorm_fused.ops`; they never run under autograd. ``affines`` are the
``(4, C)`` rows of :func:`acnorm_fused.correlation.stack_affines`. The forward
keeps ``S`` and the effective affine for the backward (``aux``, ``(C + 2, C)``):
on a CPU each call on these tiny tensors costs more than its arithmetic, so
computing them once per step matters, and they are only C x C.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..correlation import as_dtype, compute_dtype, correlation_from_stack, recalibrate, recalibrate_grad
from .activation import activation_grad, apply_activation


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


# On a contiguous (N, C, *spatial) CPU input, ATen's training-mode BatchNorm
# forward is slow: about ten times its eval-mode pass (3.3 ms against 0.35 ms
# at (2, 32, 32, 32, 32) on a 2-core machine; its backward is fine). For such
# inputs this backend computes the statistics itself with two-pass reductions
# (the mean, then the sum of squares of x - mean by BLAS dot products: exact
# for large means, unlike E[x^2] - E[x]^2), about twice as fast, and turns the
# centred temporary into the output in place, so no more memory is live than
# in ATen's kernel. Its dozen small calls cost more than they save below
# about 2^17 elements (measured: a tie at (8, 32, 8, 8, 8), ATen ahead at
# (2, 64, 8, 8, 8), this path twice as fast from (2, 32, 16, 16, 16) on).
_OWN_REDUCTIONS_MIN_NUMEL = 1 << 18


def _uses_own_reductions(x: Tensor) -> bool:
    spatial = x.numel() // max(x.shape[0] * x.shape[1], 1)
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() > 2
        and spatial > 1
        and x.numel() >= _OWN_REDUCTIONS_MIN_NUMEL
        and x.is_contiguous()
    )


def _channel_sum_of_squares(t: Tensor) -> Tensor:
    """Per-channel sum of ``t * t`` for a contiguous ``(N, C, *)`` tensor, with no
    temporary: one dot product per (sample, channel) row, by BLAS."""
    rows = t.view(t.shape[0] * t.shape[1], 1, -1)
    return torch.bmm(rows, rows.transpose(1, 2)).view(t.shape[0], t.shape[1]).sum(0)


def _train_forward_own_reductions(
    x: Tensor, w: Tensor, b: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out, mean, var, invstd)`` of a training-mode BatchNorm of a contiguous CPU input."""
    count = x.numel() // x.shape[1]
    mean = x.view(x.shape[0], x.shape[1], -1).mean((0, 2))
    centered = x - _channel_view(mean, x.dim())
    var = _channel_sum_of_squares(centered) / count
    invstd = torch.rsqrt(var + eps)
    out = centered.mul_(_channel_view(w * invstd, x.dim())).add_(_channel_view(b, x.dim()))
    return out, mean, var, invstd


def aux_like(weight: Tensor) -> Tensor:
    """An empty tensor shaped like the ``aux`` this backend keeps for the backward
    (``S`` with the effective affine ``W``, ``B`` as two more rows)."""
    channels = weight.shape[0]
    return weight.new_empty((channels + 2, channels), dtype=compute_dtype(weight.dtype))


def forward(
    x: Tensor,
    affines: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_batch_stats: bool,
    momentum: float,
    eps: float,
    temperature: float,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(out, mean, invstd, new_running_mean, new_running_var, aux)``.

    ``momentum`` is the effective factor of one running-statistics update. The
    running statistics are never modified: their updated values are returned
    (empty tensors when there are none or when ``use_batch_stats`` is false).
    """
    s = correlation_from_stack(affines, eps, temperature)
    aux = torch.cat((s, recalibrate(s, affines[2:])))
    bn_dtype = compute_dtype(x.dtype)
    w, b = as_dtype(aux[-2], bn_dtype), as_dtype(aux[-1], bn_dtype)
    new_mean = new_var = None
    if use_batch_stats and _uses_own_reductions(x):
        out, mean, var, invstd = _train_forward_own_reductions(x, w, b, eps)
        if running_mean is not None:
            count = x.numel() // x.shape[1]
            new_mean = torch.lerp(as_dtype(running_mean, bn_dtype), mean, momentum)
            new_var = torch.lerp(as_dtype(running_var, bn_dtype), var * (count / (count - 1)), momentum)
    elif use_batch_stats:
        if running_mean is not None:
            new_mean = running_mean.to(bn_dtype, copy=True)
            new_var = running_var.to(bn_dtype, copy=True)
        out, mean, invstd = torch.native_batch_norm(x, w, b, new_mean, new_var, True, momentum, eps)
    else:
        mean = running_mean.to(bn_dtype, copy=True)
        var = as_dtype(running_var, bn_dtype)
        out, _, _ = torch.native_batch_norm(x, w, b, mean, var, False, 0.0, eps)
        invstd = torch.rsqrt(var + eps)
    if new_mean is None:
        new_mean = x.new_empty((0,), dtype=bn_dtype)
        new_var = x.new_empty((0,), dtype=bn_dtype)
    out = apply_activation(out, activation, negative_slope, inplace=True)
    return out, mean, invstd, new_mean, new_var, aux


def backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    weight_target: Tensor,
    bias_target: Tensor,
    mean: Tensor,
    invstd: Tensor,
    aux: Tensor,
    use_batch_stats: bool,
    eps: float,
    temperature: float,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor]:
    """Returns ``(grad_x, grad_target)``, the latter the ``(2, C)`` rows of the
    gradients of ``weight_target`` and ``bias_target``. The affine parameters
    are not read: ``aux`` holds all this backend needs of them."""
    s = aux[:-2]
    bn_dtype = compute_dtype(x.dtype)
    w, b = as_dtype(aux[-2], bn_dtype), as_dtype(aux[-1], bn_dtype)
    if activation:
        scale = w * invstd
        shift = b - mean * scale
        pre = x * _channel_view(scale, x.dim()) + _channel_view(shift, x.dim())
        grad_out = activation_grad(grad_out, pre, activation, negative_slope)
    if use_batch_stats:
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, w, None, None, mean, invstd, True, eps, [True, True, True]
        )
    else:
        reduce_dims = [0] + list(range(2, x.dim()))
        x_hat = (x - _channel_view(mean, x.dim())) * _channel_view(invstd, x.dim())
        grad_w = (grad_out * x_hat).sum(reduce_dims, dtype=w.dtype)
        grad_b = grad_out.sum(reduce_dims, dtype=w.dtype)
        grad_x = (grad_out * _channel_view(w * invstd, x.dim())).to(x.dtype)
    return grad_x, recalibrate_grad(s, torch.stack((grad_w, grad_b)))
