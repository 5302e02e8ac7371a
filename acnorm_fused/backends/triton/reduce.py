"""Per-channel reduction passes over x: the training statistics (forward) and
the two gradient sums (backward), one kernel per layout.

Each program reduces one chunk of one channel (planar) or of a block of
channels (interleaved) in fp32 and writes its partial result to
``partials[k, channel, split]``; the finalise kernels merge the partials of a
channel in a fixed order, so results do not depend on scheduling. With
``GRAD`` false a program keeps per-lane Welford states (count, mean, M2) and
merges its lanes with Chan's formula; with ``GRAD`` true it sums ``dy`` and
``dy * (x - mean)``, ``dy`` taken through the activation's derivative, whose
mask is recomputed from x with the forward's scale and effective bias.

The statistics accumulate ``x - K``, ``K`` the channel's first value: with a
large mean and a small spread (CT intensities) every running mean of raw x
would round at the scale of the mean, while ``x - K`` is exact and small.
The mean then travels as ``K + m`` (aux rows ``centre_hi``, ``centre_lo``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .primitives import (
    AUX_CENTRE_HI,
    AUX_CENTRE_LO,
    AUX_SCALE,
    AUX_SHIFT_B,
    activation_grad,
    chan_merge,
    welford_step,
)


@triton.jit
def _channel_constants(x_ptr, aux_ptr, channels, pilot_offsets, C, channel_mask, GRAD: tl.constexpr):
    """The per-channel values of a pass, shaped like ``channels``: the centring
    pilot ``K`` for the statistics; scale, bias and centre from ``aux`` for the
    gradient sums (zeros where a pass does not use them)."""
    zero = tl.where(channel_mask, 0.0, 0.0)
    if GRAD:
        pilot = zero
        scale = tl.load(aux_ptr + AUX_SCALE * C + channels, mask=channel_mask, other=0.0)
        bias = tl.load(aux_ptr + AUX_SHIFT_B * C + channels, mask=channel_mask, other=0.0)
        centre_hi = tl.load(aux_ptr + AUX_CENTRE_HI * C + channels, mask=channel_mask, other=0.0)
        centre_lo = tl.load(aux_ptr + AUX_CENTRE_LO * C + channels, mask=channel_mask, other=0.0)
    else:
        pilot = tl.load(x_ptr + pilot_offsets, mask=channel_mask, other=0.0).to(tl.float32)
        scale = zero
        bias = zero
        centre_hi = zero
        centre_lo = zero
    return pilot, scale, bias, centre_hi, centre_lo


@triton.jit
def _accumulate(acc_n, acc_a, acc_b, x_ptr, dy_ptr, offsets, mask,
                pilot, scale, bias, centre_hi, centre_lo, slope, GRAD: tl.constexpr, ACT: tl.constexpr):
    """Add one tile to the per-lane accumulators."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if GRAD:
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        centred = (x - centre_hi) - centre_lo
        dy = activation_grad(dy, centred * scale + bias, slope, ACT)
        acc_a += dy
        acc_b += dy * centred  # dy is 0 on masked lanes
    else:
        acc_n, acc_a, acc_b = welford_step(acc_n, acc_a, acc_b, x - pilot, mask)
    return acc_n, acc_a, acc_b


@triton.jit
def _store_partials(out_ptr, plane, acc_n, acc_a, acc_b, mask, GRAD: tl.constexpr):
    """Reduce the lanes (axis 0) and store one partial result per channel."""
    if GRAD:
        tl.store(out_ptr, tl.sum(acc_a, axis=0), mask=mask)
        tl.store(out_ptr + plane, tl.sum(acc_b, axis=0), mask=mask)
    else:
        count, mean, m2 = tl.reduce((acc_n, acc_a, acc_b), 0, chan_merge)
        tl.store(out_ptr, count, mask=mask)
        tl.store(out_ptr + plane, mean, mask=mask)
        tl.store(out_ptr + 2 * plane, m2, mask=mask)


@triton.jit
def reduce_planar_kernel(
    x_ptr, dy_ptr, partials_ptr, aux_ptr,
    N, C, S, n_chunk, s_chunk, slope,
    BLOCK: tl.constexpr, GRAD: tl.constexpr, ACT: tl.constexpr,
):
    channel = tl.program_id(0)
    s_split = tl.program_id(1)
    n_split = tl.program_id(2)
    num_splits = tl.num_programs(1) * tl.num_programs(2)
    split = n_split * tl.num_programs(1) + s_split
    lanes = tl.arange(0, BLOCK)
    acc_n = tl.zeros([BLOCK], tl.float32)
    acc_a = tl.zeros([BLOCK], tl.float32)
    acc_b = tl.zeros([BLOCK], tl.float32)
    pilot, scale, bias, centre_hi, centre_lo = _channel_constants(
        x_ptr, aux_ptr, channel, channel.to(tl.int64) * S, C, channel < C, GRAD)
    s_start = s_split * s_chunk
    s_end = tl.minimum(s_start + s_chunk, S)
    n_start = n_split * n_chunk
    n_end = tl.minimum(n_start + n_chunk, N)
    for n in range(n_start, n_end):
        row_start = (n * C + channel).to(tl.int64) * S
        # Chunks are whole blocks except at S, so ``< S`` is the only bound.
        for s in range(s_start, s_end, BLOCK):
            acc_n, acc_a, acc_b = _accumulate(
                acc_n, acc_a, acc_b, x_ptr, dy_ptr, row_start + s + lanes, s + lanes < S,
                pilot, scale, bias, centre_hi, centre_lo, slope, GRAD, ACT)
    _store_partials(partials_ptr + channel * num_splits + split, C * num_splits,
                    acc_n, acc_a, acc_b, channel < C, GRAD)


@triton.jit
def reduce_interleaved_kernel(
    x_ptr, dy_ptr, partials_ptr, aux_ptr,
    R, C, r_chunk, slope,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GRAD: tl.constexpr, ACT: tl.constexpr,
):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    channel_mask = channels < C
    acc_n = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    acc_a = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    # Row 0 holds every channel's first value.
    pilot, scale, bias, centre_hi, centre_lo = _channel_constants(
        x_ptr, aux_ptr, channels, channels, C, channel_mask, GRAD)
    r_start = split * r_chunk
    r_end = tl.minimum(r_start + r_chunk, R)
    for r in range(r_start, r_end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        acc_n, acc_a, acc_b = _accumulate(
            acc_n, acc_a, acc_b, x_ptr, dy_ptr,
            rows.to(tl.int64)[:, None] * C + channels[None, :],
            (rows < R)[:, None] & channel_mask[None, :],
            pilot, scale, bias, centre_hi, centre_lo, slope, GRAD, ACT)
    _store_partials(partials_ptr + channels * num_splits + split, C * num_splits,
                    acc_n, acc_a, acc_b, channel_mask, GRAD)
