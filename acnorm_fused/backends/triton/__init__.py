"""The ``triton`` backend: AC-Norm in fused Triton kernels.

The steps and buffers are those of :mod:`..multipass`; this package holds the
kernels, one family per file, and :class:`TritonKernels` launches them. With
``TRITON_INTERPRET=1`` set before triton is imported the same kernels run on
CPU tensors, slowly: that is how they are tested without a GPU.
"""

from __future__ import annotations

from torch import Tensor

from ..geometry import CORRELATION_BLOCK, Geometry, finalise_blocks
from ..multipass import MultiPassBackend
from .elementwise import elementwise_interleaved_kernel, elementwise_planar_kernel
from .finalize import finalise_backward_kernel, finalise_forward_kernel, target_grad_kernel
from .primitives import ACTIVATION_CODES
from .reduce import reduce_interleaved_kernel, reduce_planar_kernel


class TritonKernels:
    """Launches of the Triton kernels (see :class:`..multipass.PassKernels`)."""

    def reduce(self, geo: Geometry, x: Tensor, dy: Tensor | None, partials: Tensor,
               aux: Tensor, activation: str, slope: float) -> None:
        grad = dy is not None
        dy = x if dy is None else dy
        act = ACTIVATION_CODES[activation]
        if geo.planar:
            reduce_planar_kernel[geo.reduce_grid()](
                x, dy, partials, aux,
                geo.n, geo.c, geo.s, geo.n_chunk, geo.s_chunk, slope,
                BLOCK=geo.reduce_block, GRAD=grad, ACT=act, num_warps=geo.reduce_num_warps,
            )
        else:
            reduce_interleaved_kernel[geo.reduce_grid()](
                x, dy, partials, aux,
                geo.rows, geo.c, geo.r_chunk, slope,
                BLOCK_R=geo.reduce_block_r, BLOCK_C=geo.block_c, GRAD=grad, ACT=act,
                num_warps=geo.reduce_num_warps,
            )

    def elementwise(self, geo: Geometry, x: Tensor, dy: Tensor | None, out: Tensor,
                    aux: Tensor, coef: Tensor, activation: str, slope: float) -> None:
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
                BLOCK_R=geo.block_r, BLOCK_C=geo.block_c, GRAD=grad, ACT=act,
                num_warps=geo.num_warps,
            )

    def finalise_forward(
        self, geo: Geometry, x: Tensor, affines: tuple[Tensor, ...], partials: Tensor | None,
        given: tuple[Tensor, Tensor | None, Tensor] | None, count: float,
        running_mean: Tensor | None, running_var: Tensor | None, outputs: tuple[Tensor, ...],
        momentum: float, eps: float, temperature: float, status: Tensor | None = None,
    ) -> None:
        mean, invstd, new_mean, new_var, aux = outputs
        centre, mean_rel, var = given if given is not None else (mean, None, mean)  # unread when partials
        block_ch, block_split = finalise_blocks(geo.c, geo.splits)
        finalise_forward_kernel[(-(-geo.c // block_ch),)](
            mean if partials is None else partials, geo.splits, x, geo.s if geo.planar else 1,
            *affines, centre, centre if mean_rel is None else mean_rel, var,
            mean if running_mean is None else running_mean,
            mean if running_var is None else running_var,
            mean, invstd, new_mean, new_var, aux, mean if status is None else status,
            geo.c, count, momentum, eps, temperature,
            BATCH_STATS=partials is not None, HAS_MEAN_REL=mean_rel is not None,
            UPDATE_RUNNING=running_mean is not None, STATUS=status is not None,
            BLOCK_CH=block_ch, BLOCK_SPLIT=block_split, BLOCK_J=CORRELATION_BLOCK,
        )

    def finalise_backward(self, partials: Tensor, global_sums: Tensor | None, invstd: Tensor,
                          aux: Tensor, grad_affine: Tensor, coef: Tensor, count: float,
                          use_batch_stats: bool) -> None:
        channels, num_splits = partials.shape[1], partials.shape[2]
        block_ch, block_split = finalise_blocks(channels, num_splits)
        finalise_backward_kernel[(-(-channels // block_ch),)](
            partials, num_splits, partials if global_sums is None else global_sums,
            invstd, aux, grad_affine, coef, channels, count,
            BATCH_STATS=use_batch_stats, HAS_GLOBAL=global_sums is not None,
            BLOCK_CH=block_ch, BLOCK_SPLIT=block_split,
        )

    def target_grad(self, aux: Tensor, grad_affine: Tensor, grad_target: Tensor,
                    temperature: float) -> None:
        channels = aux.shape[1]
        target_grad_kernel[(-(-channels // CORRELATION_BLOCK),)](
            aux, grad_affine, grad_target, channels, temperature,
            BLOCK_I=CORRELATION_BLOCK, BLOCK_J=CORRELATION_BLOCK,
        )


# aux_like, forward, backward, ...: the contract of backends/pytorch.py.
BACKEND = MultiPassBackend(TritonKernels())
# Every kernel the backend launches (the audit compiles them; stand-ins replace their launches).
KERNELS = (reduce_planar_kernel, reduce_interleaved_kernel, elementwise_planar_kernel,
           elementwise_interleaved_kernel, finalise_forward_kernel, finalise_backward_kernel, target_grad_kernel)
