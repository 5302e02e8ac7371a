"""The ``torch`` backend: AC-Norm as one BatchNorm with the effective affine.

Because both BatchNorms of the authors' formulation normalise with the same
statistics, their sum is one BatchNorm with ``W = (I + S) gamma_t`` and
``B = (I + S) beta_t``. This backend runs exactly that, with ATen's BatchNorm
kernels (and its own statistics pass where ATen's is slow, see below), so it
costs one BatchNorm plus a C x C step. It is the default on CPUs and the model
the fused GPU backends follow.

``forward`` and ``backward`` are the implementations behind the custom ops in
:mod:`acnorm_fused.ops`; they never run under autograd. The call's settings
arrive as one :class:`.config.StepConfig`. ``affines`` are the
``(4, C)`` rows of :func:`acnorm_fused.correlation.stack_affines`. The forward
keeps ``S`` and the effective affine for the backward (``aux``, ``(C + 2, C)``):
on a CPU each call on these tiny tensors costs more than its arithmetic, so
computing them once per step matters, and they are only C x C.

``local_statistics``, ``forward_with_statistics``, ``grad_sums`` and
``backward_with_sums`` are the same operation in steps, for statistics shared
between processes (:mod:`acnorm_fused.distributed`): the local moments, the
forward with given statistics, the local gradient sums, and the backward with
the summed ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..correlation import (
    as_dtype,
    compiled_windows,
    compute_dtype,
    recalibrate_grad,
    recalibrated_state,
    state_rows,
)
from ..statistics import MOMENT_ROWS
from .activation import activation_grad, apply_activation
from .config import StepConfig


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _as_rows(t: Tensor) -> Tensor | None:
    """The ``(N * spatial, C)`` view of a channels-last or ``(N, C)`` tensor whose
    memory is rows of C values, else None. Per-channel reductions over its rows
    run at memory speed on a CPU, where ATen's over dims (0, 2, ...) of a
    channels-last tensor took 22 ms against 2 at (2, 32, 32, 32, 32)."""
    if t.dim() == 2 and t.is_contiguous():
        return t
    if t.dim() in _CHANNELS_LAST and t.is_contiguous(memory_format=_CHANNELS_LAST[t.dim()]):
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    return None


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


def _large_planar_cpu(x: Tensor) -> bool:
    """A contiguous CPU input large enough for the own reductions to pay."""
    spatial = x.numel() // max(x.shape[0] * x.shape[1], 1)
    return (
        x.device.type == "cpu"
        and x.dim() > 2
        and spatial > 1
        and x.numel() >= _OWN_REDUCTIONS_MIN_NUMEL
        and x.is_contiguous()
    )


def _uses_own_reductions(x: Tensor) -> bool:
    # ATen's own kernels are fast for half-precision inputs.
    return x.dtype in (torch.float32, torch.float64) and _large_planar_cpu(x)


def _channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-channel sum of ``a * b`` for contiguous ``(N, C, *)`` tensors, with no
    temporary: one dot product per (sample, channel) row, by BLAS."""
    n, c = a.shape[0], a.shape[1]
    rows_a = a.view(n * c, 1, -1)
    rows_b = b.view(n * c, 1, -1)
    return torch.bmm(rows_a, rows_b.transpose(1, 2)).view(n, c).sum(0)


def _own_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, biased var, x - mean)`` of a contiguous CPU input, by the two-pass
    reductions described above."""
    count = x.numel() // x.shape[1]
    mean = x.view(x.shape[0], x.shape[1], -1).mean((0, 2))
    centered = x - _channel_view(mean, x.dim())
    return mean, _channel_dot(centered, centered) / count, centered


def _train_forward_own_reductions(
    x: Tensor, w: Tensor, b: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out, mean, var, invstd)`` of a training-mode BatchNorm of a contiguous CPU input."""
    mean, var, centered = _own_moments(x)
    invstd = torch.rsqrt(var + eps)
    out = centered.mul_(_channel_view(w * invstd, x.dim())).add_(_channel_view(b, x.dim()))
    return out, mean, var, invstd


def _moved_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: float, momentum: float, in_place: bool = False) -> tuple[Tensor, Tensor]:
    """Running statistics after one update with the batch's mean and biased variance
    (``in_place``: the given tensors, moved; their dtype is the statistics')."""
    unbiased = var * (count / (count - 1))
    if in_place:
        return running_mean.lerp_(mean, momentum), running_var.lerp_(unbiased, momentum)
    dtype = mean.dtype
    return (torch.lerp(as_dtype(running_mean, dtype), mean, momentum),
            torch.lerp(as_dtype(running_var, dtype), unbiased, momentum))


def _normalise_with(x: Tensor, w: Tensor, b: Tensor, mean: Tensor, var: Tensor,
                    eps: float) -> tuple[Tensor, Tensor]:
    """``(out, invstd)`` of BatchNorm with given statistics."""
    out, _, _ = torch.native_batch_norm(x, w, b, mean, var, False, 0.0, eps)
    return out, torch.rsqrt(var + eps)


def aux_like(weight: Tensor) -> Tensor:
    """An empty tensor shaped like the ``aux`` this backend keeps for the backward
    (``S``, or a wide layer's window state, with the effective affine
    ``W``, ``B`` as two more rows)."""
    channels, dtype = weight.shape[0], compute_dtype(weight.dtype)
    return weight.new_empty((state_rows(channels, weight.device, dtype) + 2, channels), dtype=dtype)


class PreparedStep:
    """This backend's forward and backward for one input signature, parameter
    dtype and set of settings, with every choice that depends on those alone
    (dtypes, the statistics pass, the compiled windows of a wide layer) made
    once. :func:`forward` and :func:`backward` build one per call; a launch
    plan (:mod:`acnorm_fused.backends.plan`) keeps one for its layer.

    ``param`` is any tensor of the affine parameters (or their stacked rows):
    its dtype, device and last dimension (C) are what count. With
    ``update_in_place`` the forward moves the running statistics in place
    (when their dtype is the BatchNorm's) and returns them as the new ones;
    otherwise it never modifies them. Where the compiled windows run
    (:attr:`windows`), the affines may be given as a tuple of their four rows,
    which the compiled call checks for NaN and infinity before anything
    else: a ValueError naming ``caller``.
    """

    def __init__(self, x: Tensor, param: Tensor, config: StepConfig, *, update_in_place: bool = False,
                 caller: str = "the torch backend"):
        self.config = config
        self.caller = caller
        self.bn_dtype = compute_dtype(x.dtype)
        self.windows = compiled_windows(param)
        self.own_reductions = config.use_batch_stats and _uses_own_reductions(x)
        self.update_in_place = update_in_place

    def effective_affine(self, affines: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """``(aux, W, B)``: S (or, for wide layers, the window state it is applied from)
        with the effective affine as two more rows, and W, B in the BatchNorm's dtype."""
        config = self.config
        if self.windows is not None:
            rows = affines if isinstance(affines, tuple) else affines.contiguous()
            aux = self.windows.recalibrated(rows, config.eps, config.temperature, self.caller)
        else:
            assert isinstance(affines, Tensor)  # rows apart only for the compiled windows
            aux = recalibrated_state(affines, config.eps, config.temperature)
        return aux, as_dtype(aux[-2], self.bn_dtype), as_dtype(aux[-1], self.bn_dtype)

    def forward(self, x: Tensor, affines: Tensor | tuple[Tensor, ...], running_mean: Tensor | None,
                running_var: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """See :func:`forward`."""
        config, bn_dtype = self.config, self.bn_dtype
        momentum, eps = config.momentum, config.eps
        aux, w, b = self.effective_affine(affines)
        new_mean = new_var = None
        in_place = self.update_in_place and running_mean is not None and running_mean.dtype == bn_dtype
        if self.own_reductions:
            out, mean, var, invstd = _train_forward_own_reductions(x, w, b, eps)
            if running_mean is not None:
                assert running_var is not None  # given together with running_mean (checked)
                new_mean, new_var = _moved_running_stats(
                    running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum, in_place)
        elif config.use_batch_stats:
            if in_place:
                new_mean, new_var = running_mean, running_var
            elif running_mean is not None:
                assert running_var is not None  # given together with running_mean (checked)
                new_mean = running_mean.to(bn_dtype, copy=True)
                new_var = running_var.to(bn_dtype, copy=True)
            out, mean, invstd = torch.native_batch_norm(x, w, b, new_mean, new_var, True, momentum, eps)
        else:
            assert running_mean is not None and running_var is not None  # required without batch statistics
            mean = running_mean.to(bn_dtype, copy=True)
            out, invstd = _normalise_with(x, w, b, mean, as_dtype(running_var, bn_dtype), eps)
        if new_mean is None:
            new_mean = x.new_empty((0,), dtype=bn_dtype)
            new_var = x.new_empty((0,), dtype=bn_dtype)
        assert new_var is not None  # set with new_mean
        if config.activation:
            out = apply_activation(out, config.activation, config.negative_slope, inplace=True)
        return out, mean, invstd, new_mean, new_var, aux

    def backward(self, grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, aux: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """``(grad_x, grad_weight_target, grad_bias_target)`` (see :func:`backward`)."""
        config = self.config
        w = as_dtype(aux[-2], self.bn_dtype)
        if config.activation:
            grad_out = _through_activation(grad_out, x, mean, invstd, aux, config.activation, config.negative_slope)
        if config.use_batch_stats:
            grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, w, None, None, mean, invstd, True, config.eps, [True, True, True]
            )
        else:
            sum_dy, sum_dy_xmu = _sums(grad_out, x, mean, w.dtype)
            grad_w, grad_b = sum_dy_xmu * invstd, sum_dy
            grad_x = (grad_out * _channel_view(w * invstd, x.dim())).to(x.dtype)
        windows = self.windows
        # A state with the compiled cache (not one the PyTorch windows made), and the gradients in its dtype.
        if windows is not None and aux.shape[0] == windows.state_rows + 2 and grad_w.dtype == windows.dtype:
            windows.grad_in_place(aux, (grad_w, grad_b), config.temperature)
            return grad_x, grad_w, grad_b
        grad_target = recalibrate_grad(aux[:-2], torch.stack((grad_w, grad_b)), config.temperature)
        return grad_x, grad_target[0], grad_target[1]


def forward(
    x: Tensor,
    affines: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    config: StepConfig,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(out, mean, invstd, new_running_mean, new_running_var, aux)``.

    ``config.momentum`` is the effective factor of one running-statistics
    update. The running statistics are never modified: their updated values
    are returned (empty tensors when there are none or when
    ``config.use_batch_stats`` is false).
    """
    return PreparedStep(x, affines, config).forward(x, affines, running_mean, running_var)


def backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    aux: Tensor,
    config: StepConfig,
) -> tuple[Tensor, Tensor]:
    """Returns ``(grad_x, grad_target)``, the latter the ``(2, C)`` rows of the
    gradients of ``weight_target`` and ``bias_target``; ``aux`` holds all this
    backend needs of the affine parameters."""
    grad_x, grad_weight_target, grad_bias_target = PreparedStep(x, aux, config).backward(
        grad_out, x, mean, invstd, aux)
    return grad_x, torch.stack((grad_weight_target, grad_bias_target))


def _through_activation(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, aux: Tensor,
                        activation: str, negative_slope: float) -> Tensor:
    """The gradient with respect to the normalised output before the activation,
    whose mask is recomputed from x."""
    if not activation:
        return grad_out
    bn_dtype = compute_dtype(x.dtype)
    scale = as_dtype(aux[-2], bn_dtype) * invstd
    shift = as_dtype(aux[-1], bn_dtype) - mean * scale
    pre = x * _channel_view(scale, x.dim()) + _channel_view(shift, x.dim())
    return activation_grad(grad_out, pre, activation, negative_slope)


def _sums(grad: Tensor, x: Tensor, mean: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``."""
    x_rows, grad_rows = _as_rows(x), _as_rows(grad)
    if x_rows is not None and grad_rows is not None:
        centred = x_rows - mean
        return grad_rows.sum(0, dtype=dtype), centred.mul_(grad_rows).sum(0, dtype=dtype)
    centred = as_dtype(x, dtype) - _channel_view(mean, x.dim())
    if _large_planar_cpu(x) and grad.is_contiguous():
        grad = as_dtype(grad, dtype)
        return grad.view(x.shape[0], x.shape[1], -1).sum((0, 2)), _channel_dot(grad, centred)
    return grad.sum(_reduce_dims(x), dtype=dtype), (grad * centred).sum(_reduce_dims(x), dtype=dtype)


def local_statistics(x: Tensor) -> Tensor:
    """Moments of this process's batch, ``(4, C)`` in the compute dtype, rows as
    :data:`acnorm_fused.statistics.MOMENT_ROWS` (the centre is the batch mean)."""
    channels = x.shape[1]
    dtype = compute_dtype(x.dtype)
    count = x.numel() // channels
    moments = x.new_zeros((MOMENT_ROWS, channels), dtype=dtype)
    rows = _as_rows(x)
    if count:
        if _large_planar_cpu(x):  # in the compute dtype: ATen's reductions over dims (0, 2, ...) are slow
            mean, var, _ = _own_moments(as_dtype(x, dtype))
        elif rows is not None:
            mean = rows.mean(0, dtype=dtype)
            var = (rows - mean).square_().sum(0) / count
        else:
            var, mean = torch.var_mean(as_dtype(x, dtype), _reduce_dims(x), correction=0)
        moments[0] = count
        moments[1] = mean
        moments[3] = var * count
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
    config: StepConfig,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The training forward with batch statistics computed elsewhere (mean
    ``centre + mean_rel``, biased ``var`` over ``count`` values); returns as
    :func:`forward`, the running statistics moved when given."""
    bn_dtype = compute_dtype(x.dtype)
    aux, w, b = PreparedStep(x, affines, config).effective_affine(affines)
    mean = as_dtype(centre, bn_dtype) + as_dtype(mean_rel, bn_dtype)
    var = as_dtype(var, bn_dtype)
    out, invstd = _normalise_with(x, w, b, mean, var, config.eps)
    if running_mean is not None:
        assert running_var is not None  # given together with running_mean (checked)
        new_mean, new_var = _moved_running_stats(running_mean, running_var, mean, var, count, config.momentum)
    else:
        new_mean = new_var = x.new_empty((0,), dtype=bn_dtype)
    out = apply_activation(out, config.activation, config.negative_slope, inplace=True)
    return out, mean, invstd, new_mean, new_var, aux


def grad_sums(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, aux: Tensor,
              config: StepConfig) -> Tensor:
    """This process's ``(2, C)`` rows ``sum(dy)``, ``sum(dy * (x - mean))``, with ``dy``
    taken through the activation."""
    grad = _through_activation(grad_out, x, mean, invstd, aux, config.activation, config.negative_slope)
    return torch.stack(_sums(grad, x, mean, compute_dtype(x.dtype)))


def backward_with_sums(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    aux: Tensor,
    local_sums: Tensor,
    global_sums: Tensor,
    count: float,
    config: StepConfig,
) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_target)`` of the training forward whose statistics cover
    ``count`` values in all: dx from the sums over all of them
    (``global_sums``), the target-affine gradients from this process's."""
    grad = _through_activation(grad_out, x, mean, invstd, aux, config.activation, config.negative_slope)
    w = as_dtype(aux[-2], compute_dtype(x.dtype))
    ndim = x.dim()
    mean_dy = _channel_view(global_sums[0] / count, ndim)
    projection = _channel_view(global_sums[1] * invstd * invstd / count, ndim)
    # One temporary, turned into dx in place: (dy - mean(dy) - (x - mean) * projection) * W * invstd.
    grad_x = as_dtype(x, w.dtype) - _channel_view(mean, ndim)
    grad_x.mul_(projection.neg()).add_(grad).sub_(mean_dy).mul_(_channel_view(w * invstd, ndim))
    grad_x = as_dtype(grad_x, x.dtype)
    grad_affine = torch.stack((local_sums[1] * invstd, local_sums[0]))
    return grad_x, recalibrate_grad(aux[:-2], grad_affine, config.temperature)
