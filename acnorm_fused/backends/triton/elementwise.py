"""Elementwise passes over x: the forward apply
``y = act(pre)``, ``pre = (x - mean) * scale + B``, and the backward
``dx = scale * act'(pre) * dy + p * (x - mean) + q``, one kernel per layout;
``x - mean`` is computed as ``(x - hi) - lo`` (see :mod:`..multipass`).

Programs run in reverse order of the reduction pass that precedes them, so
the first tiles they touch are the last the reduction read, still in L2.
``scale`` and ``B`` are rows 0 and 1 of ``aux``; ``p`` and ``q`` (backward
only) the rows of ``coef``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .primitives import AUX_CENTRE_HI, AUX_CENTRE_LO, AUX_SCALE, AUX_SHIFT_B, activate, activation_grad


@triton.jit
def _apply_tile(x_ptr, dy_ptr, out_ptr, aux_ptr, coef_ptr, offsets, mask, channels, channel_mask, C, slope,
                GRAD: tl.constexpr, ACT: tl.constexpr):
    """One tile of either pass; ``channels`` (a scalar or a vector) index the
    per-channel rows and broadcast against the tile."""
    scale = tl.load(aux_ptr + AUX_SCALE * C + channels, mask=channel_mask, other=0.0)
    bias = tl.load(aux_ptr + AUX_SHIFT_B * C + channels, mask=channel_mask, other=0.0)
    hi = tl.load(aux_ptr + AUX_CENTRE_HI * C + channels, mask=channel_mask, other=0.0)
    lo = tl.load(aux_ptr + AUX_CENTRE_LO * C + channels, mask=channel_mask, other=0.0)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    centred = (x - hi) - lo
    pre = centred * scale + bias
    if GRAD:
        p = tl.load(coef_ptr + channels, mask=channel_mask, other=0.0)
        q = tl.load(coef_ptr + C + channels, mask=channel_mask, other=0.0)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        result = scale * activation_grad(dy, pre, slope, ACT) + p * centred + q
    else:
        result = activate(pre, slope, ACT)
    tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def elementwise_planar_kernel(
    x_ptr, dy_ptr, out_ptr, aux_ptr, coef_ptr, C, S, slope,
    BLOCK: tl.constexpr, GRAD: tl.constexpr, ACT: tl.constexpr,
):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    s_blocks = tl.cdiv(S, BLOCK)
    row = pid // s_blocks  # n * C + channel
    block = pid - row * s_blocks
    channel = row % C
    positions = block * BLOCK + tl.arange(0, BLOCK)
    _apply_tile(x_ptr, dy_ptr, out_ptr, aux_ptr, coef_ptr, row.to(tl.int64) * S + positions,
                positions < S, channel, channel < C, C, slope, GRAD, ACT)


@triton.jit
def elementwise_interleaved_kernel(
    x_ptr, dy_ptr, out_ptr, aux_ptr, coef_ptr, R, C, slope,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GRAD: tl.constexpr, ACT: tl.constexpr,
):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    row_block = pid // c_blocks
    channels = (pid - row_block * c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    channel_mask = channels < C
    _apply_tile(x_ptr, dy_ptr, out_ptr, aux_ptr, coef_ptr,
                rows.to(tl.int64)[:, None] * C + channels[None, :],
                (rows < R)[:, None] & channel_mask[None, :],
                channels, channel_mask, C, slope, GRAD, ACT)
