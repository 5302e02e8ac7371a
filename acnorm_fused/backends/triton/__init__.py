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

``local_statistics``, ``forward_with_statistics``, ``grad_sums`` and
``backward_with_sums`` run the same kernels in steps, for statistics shared
between processes (see :mod:`acnorm_fused.backends.pytorch`).
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
from ...statistics import MOMENT_ROWS, merge_moments
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
    """Launch a reduction pass: statistics when ``dy`` is None (``aux`` is then
    not read), else gradient sums."""
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


def _finalise_forward(
    geo: Geometry, x: Tensor, affines: Tensor, partials: Tensor | None,
    given: tuple[Tensor, Tensor | None, Tensor] | None, count: float,
    running_mean: Tensor | None, running_var: Tensor | None, update: bool,
    momentum: float, eps: float, temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward finalise from statistics partials, or from ``given``
    ``(centre, mean_rel or None, var)``; returns ``(mean, invstd, new_mean, new_var, aux)``."""
    channels = geo.c
    f32 = torch.float32
    mean = x.new_empty((channels,), dtype=f32)
    invstd = x.new_empty((channels,), dtype=f32)
    aux = aux_like(affines[0])
    new_mean = x.new_empty((channels if update else 0,), dtype=f32)
    new_var = x.new_empty((channels if update else 0,), dtype=f32)
    centre, mean_rel, var = given if given is not None else (mean, None, mean)  # unread when partials
    block_ch, block_split = geo.finalise_blocks()
    finalise_forward_kernel[(-(-channels // block_ch),)](
        mean if partials is None else partials, geo.splits, x, geo.s if geo.planar else 1,
        affines.to(f32).contiguous(), centre, centre if mean_rel is None else mean_rel, var,
        mean if running_mean is None else running_mean,
        mean if running_var is None else running_var,
        mean, invstd, new_mean, new_var, aux,
        channels, count, momentum, eps, temperature,
        BATCH_STATS=partials is not None, HAS_MEAN_REL=mean_rel is not None, UPDATE_RUNNING=update,
        BLOCK_CH=block_ch, BLOCK_SPLIT=block_split, BLOCK_J=CORRELATION_BLOCK,
    )
    return mean, invstd, new_mean, new_var, aux


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
    if not use_batch_stats:
        return _forward_given(x, affines, (running_mean, None, running_var), 1.0, None, None,
                              momentum, eps, temperature, activation, negative_slope)
    geo = geometry(x)
    partials = x.new_empty((3, geo.c, geo.splits), dtype=torch.float32)
    with _on_device(x):
        _reduce(geo, x, None, partials, partials, activation, negative_slope)
        stats = _finalise_forward(geo, x, affines, partials, None, float(geo.count),
                                  running_mean, running_var, running_mean is not None,
                                  momentum, eps, temperature)
        return (_apply_pass(geo, x, stats[-1], activation, negative_slope), *stats)


def _apply_pass(geo: Geometry, x: Tensor, aux: Tensor, activation: str, negative_slope: float) -> Tensor:
    """The forward's output: ``act((x - mean) * scale + B)`` in x's layout."""
    out = torch.empty_like(x)
    if x.numel():
        _elementwise(geo, x, None, out, aux, aux, activation, negative_slope)
    return out


def _forward_given(
    x: Tensor, affines: Tensor, given: tuple[Tensor, Tensor | None, Tensor], count: float,
    running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float,
    temperature: float, activation: str, negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward with given ``(centre, mean_rel or None, var)``: finalise, then apply."""
    geo = geometry(x)
    with _on_device(x):
        stats = _finalise_forward(geo, x, affines, None, given, count, running_mean, running_var,
                                  running_mean is not None, momentum, eps, temperature)
        return (_apply_pass(geo, x, stats[-1], activation, negative_slope), *stats)


def local_statistics(x: Tensor) -> Tensor:
    """Moments of this process's batch, ``(4, C)`` fp32, rows as
    :data:`acnorm_fused.statistics.MOMENT_ROWS` (the centre is the channel's
    first value, the one the kernels centre on)."""
    geo = geometry(x)
    moments = x.new_zeros((MOMENT_ROWS, geo.c), dtype=torch.float32)
    if not x.numel():
        return moments
    partials = x.new_empty((3, geo.c, geo.splits), dtype=torch.float32)
    with _on_device(x):
        _reduce(geo, x, None, partials, partials, "", 0.0)
    # The splits' moments share the centre: merge them with a zero centre.
    split_moments = torch.stack((partials[0], torch.zeros_like(partials[0]), partials[1], partials[2]))
    count, _, mean_rel, m2 = merge_moments(split_moments.permute(2, 0, 1))
    moments[0] = count
    moments[1] = x[(0, slice(None)) + (0,) * (x.dim() - 2)]
    moments[2] = mean_rel
    moments[3] = m2
    return moments


def forward_with_statistics(
    x: Tensor,
    affines: Tensor,
    centre: Tensor,
    mean_rel: Tensor,
    var: Tensor,
    count: float,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    temperature: float,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The training forward with statistics computed elsewhere (see
    :func:`..pytorch.forward_with_statistics`)."""
    return _forward_given(x, affines, (centre, mean_rel, var), count, running_mean, running_var,
                          momentum, eps, temperature, activation, negative_slope)


def _grad_like_x(grad_out: Tensor, x: Tensor) -> Tensor:
    """``grad_out`` with x's strides: the kernels walk both with the same offsets,
    and an upstream op may have handed over another layout."""
    return grad_out if grad_out.stride() == x.stride() else torch.empty_like(x).copy_(grad_out)


def _grad_partials(geo: Geometry, grad_out: Tensor, x: Tensor, aux: Tensor,
                   activation: str, negative_slope: float) -> Tensor:
    """The ``(2, C, splits)`` partial sums of ``dy`` and ``dy * (x - mean)``."""
    partials = x.new_zeros((2, geo.c, geo.splits), dtype=torch.float32)
    if x.numel():
        with _on_device(x):
            _reduce(geo, x, grad_out, partials, aux, activation, negative_slope)
    return partials


def _backward_from_partials(
    geo: Geometry, grad_out: Tensor, x: Tensor, invstd: Tensor, aux: Tensor,
    partials: Tensor, global_sums: Tensor | None, count: float, use_batch_stats: bool,
    temperature: float, activation: str, negative_slope: float,
) -> tuple[Tensor, Tensor]:
    """The backward after the reduction pass: finalise, ``(I + S)^T`` and dx."""
    channels = geo.c
    f32 = torch.float32
    grad_x = torch.empty_like(x)
    grad_affine = x.new_empty((2, channels), dtype=f32)
    coef = x.new_empty((2, channels), dtype=f32)
    grad_target = x.new_empty((2, channels), dtype=f32)
    num_splits = partials.shape[-1]
    block_ch = geo.finalise_blocks()[0] if num_splits == geo.splits else 32
    with _on_device(x):
        finalise_backward_kernel[(-(-channels // block_ch),)](
            partials, num_splits, partials if global_sums is None else global_sums,
            invstd, aux, grad_affine, coef, channels, count,
            BATCH_STATS=use_batch_stats, HAS_GLOBAL=global_sums is not None,
            BLOCK_CH=block_ch, BLOCK_SPLIT=max(1, 1 << (num_splits - 1).bit_length()),
        )
        target_grad_kernel[(-(-channels // CORRELATION_BLOCK),)](
            aux, grad_affine, grad_target, channels, temperature,
            BLOCK_I=CORRELATION_BLOCK, BLOCK_J=CORRELATION_BLOCK,
        )
        if x.numel():
            _elementwise(geo, x, grad_out, grad_x, aux, coef, activation, negative_slope)
    return grad_x, grad_target


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
    grad_out = _grad_like_x(grad_out, x)
    partials = _grad_partials(geo, grad_out, x, aux, activation, negative_slope)
    return _backward_from_partials(geo, grad_out, x, invstd, aux, partials, None, float(geo.count),
                                   use_batch_stats, temperature, activation, negative_slope)


def grad_sums(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, aux: Tensor,
              activation: str, negative_slope: float) -> Tensor:
    """This process's ``(2, C)`` sums of ``dy`` and ``dy * (x - mean)``."""
    partials = _grad_partials(geometry(x), _grad_like_x(grad_out, x), x, aux, activation, negative_slope)
    return partials.sum(-1)


def backward_with_sums(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    aux: Tensor,
    local_sums: Tensor,
    global_sums: Tensor,
    count: float,
    temperature: float,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor]:
    """See :func:`..pytorch.backward_with_sums`."""
    return _backward_from_partials(
        geometry(x), _grad_like_x(grad_out, x), x, invstd, aux, local_sums[:, :, None].contiguous(),
        global_sums.contiguous(), count, True, temperature, activation, negative_slope)
