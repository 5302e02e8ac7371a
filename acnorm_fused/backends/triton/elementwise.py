"""Elementwise passes over x: the forward apply
``y = act(pre)``, ``pre = (x - mean) * scale + B``, and the backward
``dx = scale * act'(pre) * dy + p * (x - mean) + q``, one kernel per layout;
``x - mean`` is computed as ``(x - hi) - lo`` (see :mod:`.finalize`).

Programs run in reverse order of the reduction pass that precedes them, so
the first tiles they touch are the last the reduction read, still in L2.
``scale`` and ``B`` are rows 0 and 1 of ``aux``; ``p`` and ``q`` (backward
only) the rows of ``coef``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .primitives import activate, activation_grad


@triton.jit
def _channel_affine(x, dy, hi, lo, scale, bias, p, q, slope, GRAD: tl.constexpr, ACT: tl.constexpr):
    centred = (x - hi) - lo
    pre = centred * scale + bias
    if GRAD:
        return scale * activation_grad(dy, pre, slope, ACT) + p * centred + q
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
    bias = tl.load(aux_ptr + C + channel)
    hi = tl.load(aux_ptr + 2 * C + channel)
    lo = tl.load(aux_ptr + 3 * C + channel)
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
        q = bias
    result = _channel_affine(x, dy, hi, lo, scale, bias, p, q, slope, GRAD, ACT)
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
    bias = tl.load(aux_ptr + C + channels, mask=channel_mask, other=0.0)[None, :]
    hi = tl.load(aux_ptr + 2 * C + channels, mask=channel_mask, other=0.0)[None, :]
    lo = tl.load(aux_ptr + 3 * C + channels, mask=channel_mask, other=0.0)[None, :]
    offsets = rows.to(tl.int64)[:, None] * C + channels[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if GRAD:
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(coef_ptr + channels, mask=channel_mask, other=0.0)[None, :]
        q = tl.load(coef_ptr + C + channels, mask=channel_mask, other=0.0)[None, :]
    else:
        dy = x
        p = scale
        q = bias
    result = _channel_affine(x, dy, hi, lo, scale, bias, p, q, slope, GRAD, ACT)
    tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)
