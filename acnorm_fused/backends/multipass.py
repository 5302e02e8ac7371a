"""The multi-pass fused algorithm, shared by the kernel backends.

Training forward: one reduction pass over x for the statistics (split over
enough programs to fill the GPU), one tiny finalise launch (statistics, running
statistics, the rows of S, the effective affine) and one apply pass: x is read
twice and the output written once. Eval forward: finalise and apply. Backward:
one reduction pass over x and dy, a finalise launch, the ``(I + S)^T`` step and
one pass writing dx. :class:`MultiPassBackend` drives these steps and owns
every buffer (all allocated by torch); a :class:`PassKernels` launches them,
in Triton (:mod:`.triton`) or in the compiled CUDA module (:mod:`.cuda`).
Both read the launch configuration from :mod:`.geometry`.

The buffers that pass between the steps (all fp32):

- ``partials``: ``(3, C, splits)`` count, mean and M2 of each split of the
  statistics pass, centred on the channel's first value ``K``; ``(2, C,
  splits)`` sums of ``dy`` and ``dy * (x - mean)`` of the gradient pass;
- ``aux``: ``(AUX_ROWS, C)`` written by the forward finalise, read by the
  apply pass and the whole backward: scale ``W * invstd``, ``B``, the mean as
  ``centre_hi + centre_lo`` (``K`` and the mean of ``x - K``), y_s, y_t, and
  the row maximum and row exponential sum of the softmax behind S. The passes
  compute ``((x - hi) - lo) * scale + B`` rather than ``x * scale + shift``:
  with a large mean and a small spread (CT intensities) a folded shift would
  cancel catastrophically in fp32;
- ``coef``: ``(2, C)`` the ``p`` and ``q`` of ``dx = scale * dy + p * (x -
  mean) + q``.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import Tensor

from ..statistics import MOMENT_ROWS, merge_moments
from .abi import AUX_ROWS
from .config import StepConfig
from .geometry import Geometry, geometry

# The functions every fused backend module provides (see backends/pytorch.py).
CONTRACT = ("aux_like", "forward", "backward", "local_statistics", "forward_with_statistics",
            "grad_sums", "backward_with_sums")


class PassKernels(Protocol):
    """The launches of one kernel implementation; every buffer is given."""

    def reduce(self, geo: Geometry, x: Tensor, dy: Tensor | None, partials: Tensor,
               aux: Tensor, activation: str, slope: float) -> None:
        """Statistics partials of x when ``dy`` is None (``aux`` is then not
        read), else the gradient partials."""

    def elementwise(self, geo: Geometry, x: Tensor, dy: Tensor | None, out: Tensor,
                    aux: Tensor, coef: Tensor, activation: str, slope: float) -> None:
        """The forward apply into ``out`` when ``dy`` is None, else dx."""

    def finalise_forward(
        self, geo: Geometry, x: Tensor, affines: tuple[Tensor, ...], partials: Tensor | None,
        given: tuple[Tensor, Tensor | None, Tensor] | None, count: float,
        running_mean: Tensor | None, running_var: Tensor | None, outputs: tuple[Tensor, ...],
        momentum: float, eps: float, temperature: float, status: Tensor | None = None,
    ) -> None:
        """Statistics from ``partials`` or ``given`` ``(centre, mean_rel or None,
        var)``, into ``outputs = (mean, invstd, new_mean, new_var, aux)``;
        ``new_mean`` and ``new_var`` are empty when the running statistics stay
        (or are the running statistics themselves: the update is in place).
        ``affines`` are the four fp32 rows gamma_s, beta_s, gamma_t, beta_t.
        Given a one-element int32 ``status``, it receives the
        :data:`.abi.NON_FINITE_BITS` of the affines, and the running statistics
        stay when any is set."""

    def finalise_backward(self, partials: Tensor, global_sums: Tensor | None, invstd: Tensor,
                          aux: Tensor, grad_affine: Tensor, coef: Tensor, count: float,
                          use_batch_stats: bool) -> None:
        """``dW``, ``dB`` into ``grad_affine`` and the dx coefficients into ``coef``."""

    def target_grad(self, aux: Tensor, grad_affine: Tensor, grad_target: Tensor,
                    temperature: float) -> None:
        """``(I + S)^T [dW; dB]`` into ``grad_target``."""


def on_device(x: Tensor):
    """Allocate and launch on ``x``'s GPU, whichever device is current."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _grad_like_x(grad_out: Tensor, x: Tensor) -> Tensor:
    """``grad_out`` with x's strides: the kernels walk both with the same offsets,
    and an upstream op may have handed over another layout."""
    return grad_out if grad_out.stride() == x.stride() else torch.empty_like(x).copy_(grad_out)


class MultiPassBackend:
    """The fused-backend contract of :mod:`acnorm_fused.backends.pytorch` on
    top of one :class:`PassKernels`. Inputs are float32, float16 or bfloat16,
    contiguous or channels-last (``ac_norm`` makes other strides contiguous);
    everything is accumulated in float32."""

    def __init__(self, kernels: PassKernels):
        self.kernels = kernels

    def aux_like(self, weight: Tensor) -> Tensor:
        """An empty tensor shaped like the ``aux`` this backend keeps for the backward."""
        return weight.new_empty((AUX_ROWS, weight.shape[0]), dtype=torch.float32)

    def _finalise_forward(
        self, geo: Geometry, x: Tensor, affines: Tensor, partials: Tensor | None,
        given: tuple[Tensor, Tensor | None, Tensor] | None, count: float,
        running_mean: Tensor | None, running_var: Tensor | None, config: StepConfig,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(mean, invstd, new_mean, new_var, aux)`` from partials or given statistics."""
        channels = geo.c
        update = running_mean is not None
        f32 = torch.float32
        outputs = (
            x.new_empty((channels,), dtype=f32),
            x.new_empty((channels,), dtype=f32),
            x.new_empty((channels if update else 0,), dtype=f32),
            x.new_empty((channels if update else 0,), dtype=f32),
            self.aux_like(affines[0]),
        )
        self.kernels.finalise_forward(geo, x, affines.to(f32).contiguous().unbind(0), partials, given, count,
                                      running_mean, running_var, outputs, config.momentum, config.eps,
                                      config.temperature)
        return outputs

    def _apply_pass(self, geo: Geometry, x: Tensor, aux: Tensor, config: StepConfig) -> Tensor:
        """The forward's output: ``act((x - mean) * scale + B)`` in x's layout."""
        out = torch.empty_like(x)
        if x.numel():
            self.kernels.elementwise(geo, x, None, out, aux, aux, config.activation, config.negative_slope)
        return out

    def _forward_given(
        self, x: Tensor, affines: Tensor, given: tuple[Tensor, Tensor | None, Tensor], count: float,
        running_mean: Tensor | None, running_var: Tensor | None, config: StepConfig,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The forward with given ``(centre, mean_rel or None, var)``: finalise, then apply."""
        geo = geometry(x)
        with on_device(x):
            stats = self._finalise_forward(geo, x, affines, None, given, count, running_mean,
                                           running_var, config)
            return (self._apply_pass(geo, x, stats[-1], config), *stats)

    def forward(
        self,
        x: Tensor,
        affines: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        config: StepConfig,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Returns ``(out, mean, invstd, new_running_mean, new_running_var, aux)``; the
        running statistics are not modified (see :func:`.pytorch.forward`)."""
        if not config.use_batch_stats:
            assert running_mean is not None and running_var is not None  # required without batch statistics
            return self._forward_given(x, affines, (running_mean, None, running_var), 1.0, None, None, config)
        geo = geometry(x)
        with on_device(x):
            partials = x.new_empty((3, geo.c, geo.splits), dtype=torch.float32)
            self.kernels.reduce(geo, x, None, partials, partials, config.activation, config.negative_slope)
            stats = self._finalise_forward(geo, x, affines, partials, None, float(geo.count),
                                           running_mean, running_var, config)
            return (self._apply_pass(geo, x, stats[-1], config), *stats)

    def local_statistics(self, x: Tensor) -> Tensor:
        """Moments of this process's batch, ``(4, C)`` fp32, rows as
        :data:`acnorm_fused.statistics.MOMENT_ROWS` (the centre is the channel's
        first value, the one the kernels centre on)."""
        geo = geometry(x)
        moments = x.new_zeros((MOMENT_ROWS, geo.c), dtype=torch.float32)
        if not x.numel():
            return moments
        with on_device(x):
            partials = x.new_empty((3, geo.c, geo.splits), dtype=torch.float32)
            self.kernels.reduce(geo, x, None, partials, partials, "", 0.0)
        # The splits' moments share the centre: merge them with a zero centre.
        split_moments = torch.stack((partials[0], torch.zeros_like(partials[0]), partials[1], partials[2]))
        count, _, mean_rel, m2 = merge_moments(split_moments.permute(2, 0, 1))
        moments[0] = count
        moments[1] = x[(0, slice(None)) + (0,) * (x.dim() - 2)]
        moments[2] = mean_rel
        moments[3] = m2
        return moments

    def forward_with_statistics(
        self,
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
        """The training forward with statistics computed elsewhere (see
        :func:`.pytorch.forward_with_statistics`)."""
        return self._forward_given(x, affines, (centre, mean_rel, var), count, running_mean, running_var, config)

    def _grad_partials(self, geo: Geometry, grad_out: Tensor, x: Tensor, aux: Tensor,
                       config: StepConfig) -> Tensor:
        """The ``(2, C, splits)`` partial sums of ``dy`` and ``dy * (x - mean)``."""
        shape = (2, geo.c, geo.splits)
        if not x.numel():
            return x.new_zeros(shape, dtype=torch.float32)
        with on_device(x):
            # The pass writes every partial: no zero fill (a launch of its own).
            partials = x.new_empty(shape, dtype=torch.float32)
            self.kernels.reduce(geo, x, grad_out, partials, aux, config.activation, config.negative_slope)
        return partials

    def _backward_from_partials(
        self, geo: Geometry, grad_out: Tensor, x: Tensor, invstd: Tensor, aux: Tensor,
        partials: Tensor, global_sums: Tensor | None, count: float, config: StepConfig,
    ) -> tuple[Tensor, Tensor]:
        """The backward after the reduction pass: finalise, ``(I + S)^T`` and dx."""
        f32 = torch.float32
        with on_device(x):
            grad_x = torch.empty_like(x)
            grad_affine = x.new_empty((2, geo.c), dtype=f32)
            coef = x.new_empty((2, geo.c), dtype=f32)
            grad_target = x.new_empty((2, geo.c), dtype=f32)
            self.kernels.finalise_backward(partials, global_sums, invstd, aux, grad_affine, coef,
                                           count, config.use_batch_stats)
            self.kernels.target_grad(aux, grad_affine, grad_target, config.temperature)
            if x.numel():
                self.kernels.elementwise(geo, x, grad_out, grad_x, aux, coef, config.activation,
                                         config.negative_slope)
        return grad_x, grad_target

    def backward(
        self,
        grad_out: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        aux: Tensor,
        config: StepConfig,
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(grad_x, grad_target)`` (see :func:`.pytorch.backward`); ``aux``
        holds all this backend needs of the affine parameters."""
        geo = geometry(x)
        grad_out = _grad_like_x(grad_out, x)
        partials = self._grad_partials(geo, grad_out, x, aux, config)
        return self._backward_from_partials(geo, grad_out, x, invstd, aux, partials, None,
                                            float(geo.count), config)

    def grad_sums(self, grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, aux: Tensor,
                  config: StepConfig) -> Tensor:
        """This process's ``(2, C)`` sums of ``dy`` and ``dy * (x - mean)``."""
        partials = self._grad_partials(geometry(x), _grad_like_x(grad_out, x), x, aux, config)
        return partials.sum(-1)

    def backward_with_sums(
        self,
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
        """See :func:`.pytorch.backward_with_sums`."""
        return self._backward_from_partials(
            geometry(x), _grad_like_x(grad_out, x), x, invstd, aux,
            local_sums[:, :, None].contiguous(), global_sums.contiguous(), count, config)
