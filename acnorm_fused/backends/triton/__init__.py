"""The ``triton`` backend: AC-Norm in fused Triton kernels.

Training forward: one reduction pass over x for the statistics (split over
enough programs to fill the GPU), one tiny finalise launch (statistics, running
statistics, the rows of S, the effective affine) and one apply pass: x is read
twice and the output written once. Eval forward: finalise and apply. Backward:
one reduction pass over x and dy, a finalise launch, the ``(I + S)^T`` step and
one pass writing dx. Every pass has a planar (NC(D)HW) and an interleaved
(channels-last) kernel; see :mod:`.launch`.

The functions follow the contract of :mod:`acnorm_fused.backends.pytorch`
and run behind the custom ops of :mod:`acnorm_fused.ops`. Inputs are float32,
float16 or bfloat16, contiguous or channels-last (``ac_norm`` makes other
strides contiguous); everything is accumulated in float32. With
``TRITON_INTERPRET=1`` set before triton is imported the same kernels run on
CPU tensors, slowly: that is how they are tested without a GPU.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .elementwise import elementwise_interleaved_kernel, elementwise_planar_kernel
from .finalize import (
    AUX_ROWS,
    finalise_backward_kernel,
    finalise_forward_kernel,
    target_grad_kernel,
)
from .launch import CORRELATION_BLOCK, Geometry, geometry
from .primitives import ACTIVATION_CODES
from .reduce import reduce_interleaved_kernel, reduce_planar_kernel

def _on_device(x: Tensor):
    """Launch on ``x``'s GPU, whichever device is current."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def aux_like(weight: Tensor) -> Tensor:
    """An empty tensor shaped like the ``aux`` this backend keeps for the backward
    (see :mod:`.finalize`)."""
    return weight.new_empty((AUX_ROWS, weight.shape[0]), dtype=torch.float32)


def _reduce(geo: Geometry, x: Tensor, dy: Tensor | None, partials: Tensor,
            aux: Tensor, activation: str, slope: float) -> None:
    """Launch a reduction pass: statistics when ``dy`` is None, else gradient sums."""
    grad = dy is not None
    dy = x if dy is None else dy
    act = ACTIVATION_CODES[activation]
    if geo.planar:
        reduce_planar_kernel[geo.reduce_grid()](
            x, dy, partials, aux,
            geo.n, geo.c, geo.s, geo.n_chunk, geo.s_chunk, slope,
            BLOCK=geo.reduce_block, GRAD=grad, ACT=act, num_warps=geo.num_warps,
        )
    else:
        reduce_interleaved_kernel[geo.reduce_grid()](
            x, dy, partials, aux,
            geo.rows, geo.c, geo.r_chunk, slope,
            BLOCK_R=geo.reduce_block_r, BLOCK_C=geo.block_c, GRAD=grad, ACT=act, num_warps=geo.num_warps,
        )


def _elementwise(geo: Geometry, x: Tensor, dy: Tensor | None, out: Tensor,
                 aux: Tensor, coef: Tensor, activation: str, slope: float) -> None:
    """Launch an elementwise pass: the forward apply when ``dy`` is None, else dx."""
    grad = dy is not None
    dy = x if dy is None else dy
    act = ACTIVATION_CODES[activation]
    if geo.planar:
        elementwise_planar_kernel[geo.elementwise_grid()](
            x, dy, out, aux, coef, geo.c, geo.s, slope,
            BLOCK=geo.block, GRAD=grad, ACT=act, num_warps=geo.num_warps,
        )
    else:
        elementwise_interleaved_kernel[geo.elementwise_grid()](
            x, dy, out, aux, coef, geo.rows, geo.c, slope,
            BLOCK_R=geo.block_r, BLOCK_C=geo.block_c, GRAD=grad, ACT=act, num_warps=geo.num_warps,
        )


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
    """Returns ``(out, mean, invstd, new_running_mean, new_running_var, aux)``; the
    running statistics are not modified (see :func:`..pytorch.forward`)."""
    geo = geometry(x)
    channels = geo.c
    f32 = torch.float32
    out = torch.empty_like(x)
    mean = x.new_empty((channels,), dtype=f32)
    invstd = x.new_empty((channels,), dtype=f32)
    aux = aux_like(affines[0])
    update = use_batch_stats and running_mean is not None
    new_mean = x.new_empty((channels if update else 0,), dtype=f32)
    new_var = x.new_empty((channels if update else 0,), dtype=f32)
    block_ch, block_split = geo.finalise_blocks()
    with _on_device(x):
        if use_batch_stats:
            partials = x.new_empty((3, channels, geo.splits), dtype=f32)
            _reduce(geo, x, None, partials, aux, activation, negative_slope)
        else:
            partials = mean  # not read
        finalise_forward_kernel[(-(-channels // block_ch),)](
            partials, geo.splits, x, geo.s if geo.planar else 1, affines.to(f32).contiguous(),
            mean if running_mean is None else running_mean,
            invstd if running_var is None else running_var,
            mean, invstd, new_mean, new_var, aux,
            channels, float(geo.count), momentum, eps, temperature,
            BATCH_STATS=use_batch_stats, UPDATE_RUNNING=update,
            BLOCK_CH=block_ch, BLOCK_SPLIT=block_split, BLOCK_J=CORRELATION_BLOCK,
        )
        if x.numel():
            _elementwise(geo, x, None, out, aux, aux, activation, negative_slope)
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
    """Returns ``(grad_x, grad_target)`` (see :func:`..pytorch.backward`); the affine
    parameters are not read: ``aux`` holds all this backend needs of them."""
    geo = geometry(x)
    channels = geo.c
    f32 = torch.float32
    if grad_out.stride() != x.stride():
        # The kernels walk dy with x's strides; an upstream op may have handed
        # over another layout.
        grad_out = torch.empty_like(x).copy_(grad_out)
    grad_x = torch.empty_like(x)
    partials = x.new_empty((2, channels, geo.splits), dtype=f32)
    grad_affine = x.new_empty((2, channels), dtype=f32)
    coef = x.new_empty((2, channels), dtype=f32)
    grad_target = x.new_empty((2, channels), dtype=f32)
    block_ch, block_split = geo.finalise_blocks()
    with _on_device(x):
        if x.numel():
            _reduce(geo, x, grad_out, partials, aux, activation, negative_slope)
        else:
            partials.zero_()
        finalise_backward_kernel[(-(-channels // block_ch),)](
            partials, geo.splits, invstd, aux, grad_affine, coef,
            channels, float(geo.count),
            BATCH_STATS=use_batch_stats, BLOCK_CH=block_ch, BLOCK_SPLIT=block_split,
        )
        target_grad_kernel[(-(-channels // CORRELATION_BLOCK),)](
            aux, grad_affine, grad_target, channels, temperature,
            BLOCK_I=CORRELATION_BLOCK, BLOCK_J=CORRELATION_BLOCK,
        )
        if x.numel():
            _elementwise(geo, x, grad_out, grad_x, aux, coef, activation, negative_slope)
    return grad_x, grad_target
