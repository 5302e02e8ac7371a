"""Elementwise passes over x: the forward apply ``y = act(x * scale + shift)``
and the backward ``dx = scale * act'(pre) * dy + p * x + q``, one kernel per
layout.

Programs run in reverse order of the reduction pass that precedes them, so
the first tiles they touch are the last the reduction read, still in L2.
``scale`` and ``shift`` are rows 0 and 1 of ``aux``; ``p`` and ``q`` (backward
only) the rows of ``coef``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .primitives import activate, activation_grad


@triton.jit
def _channel_affine(x, dy, scale, shift, p, q, slope, GRAD: tl.constexpr, ACT: tl.constexpr):
    pre = x * scale + shift
    if GRAD:
        return scale * activation_grad(dy, pre, slope, ACT) + p * x + q
    else:
        return activate(pre, slope, ACT)


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
    scale = tl.load(aux_ptr + channel)
    shift = tl.load(aux_ptr + C + channel)
    positions = block * BLOCK + tl.arange(0, BLOCK)
    mask = positions < S
    offsets = row.to(tl.int64) * S + positions
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if GRAD:
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(coef_ptr + channel)
        q = tl.load(coef_ptr + C + channel)
    else:
        dy = x
        p = scale
        q = shift
    result = _channel_affine(x, dy, scale, shift, p, q, slope, GRAD, ACT)
    tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


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
    mask = (rows < R)[:, None] & channel_mask[None, :]
    scale = tl.load(aux_ptr + channels, mask=channel_mask, other=0.0)[None, :]
    shift = tl.load(aux_ptr + C + channels, mask=channel_mask, other=0.0)[None, :]
    offsets = rows.to(tl.int64)[:, None] * C + channels[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if GRAD:
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(coef_ptr + channels, mask=channel_mask, other=0.0)[None, :]
        q = tl.load(coef_ptr + C + channels, mask=channel_mask, other=0.0)[None, :]
    else:
        dy = x
        p = scale
        q = shift
    result = _channel_affine(x, dy, scale, shift, p, q, slope, GRAD, ACT)
    tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)
