"""Per-channel finalise steps, between the passes over x.

``finalise_forward_kernel``: merge the statistics partials of a block of
channels (Chan's formula, fixed order) or read given statistics (the running
ones in eval, or moments merged across processes), move the running
statistics, compute each channel's row of the correlation S from
``y_t[c]`` and all of ``y_s`` (no C x C matrix is stored), the effective
affine ``W_c = gamma_t[c] + sum_j S[c, j] gamma_t[j]`` (``B_c`` alike), and the
scale ``W_c * invstd_c`` of the apply pass. Given a status word, it also
says which affines hold a NaN or an infinity (:data:`..abi.NON_FINITE_BITS`),
and then leaves the running statistics alone.

``finalise_backward_kernel``: sum the gradient partials, giving ``dW``, ``dB``
and the coefficients of ``dx = scale * dy + p * (x - mean) + q`` (from sums
over all processes when given).

``target_grad_kernel``: ``(I + S)^T [dW; dB]``, one block of columns of S per
program, S recomputed from the row normalisers the forward saved.

The buffers ``aux``, ``partials`` and ``coef`` are described in
:mod:`..multipass`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..abi import NON_FINITE_BITS
from .primitives import (
    AUX_CENTRE_HI,
    AUX_CENTRE_LO,
    AUX_ROW_MAX,
    AUX_ROW_SUM,
    AUX_SCALE,
    AUX_SHIFT_B,
    AUX_SOURCE_SIG,
    AUX_TARGET_SIG,
    affinity,
    affinity_logit,
    chan_merge,
    kept_in_s,
    signature,
)

NON_FINITE_GAMMA_S, NON_FINITE_BETA_S, NON_FINITE_GAMMA_T, NON_FINITE_BETA_T = (
    tl.constexpr(bit) for bit in NON_FINITE_BITS)


@triton.jit
def _softmax_normalisers(y_target, gamma_s_ptr, beta_s_ptr, C, eps, temperature,
                         BLOCK_CH: tl.constexpr, BLOCK_J: tl.constexpr):
    """Maximum logit and sum of exponentials of rows of A (``y_target``: one per row)."""
    row_max = tl.full([BLOCK_CH], float("-inf"), tl.float32)
    for j in range(0, C, BLOCK_J):
        cols = j + tl.arange(0, BLOCK_J)
        y_source = signature(tl.load(gamma_s_ptr + cols, mask=cols < C, other=1.0),
                             tl.load(beta_s_ptr + cols, mask=cols < C, other=0.0), eps)
        logits = affinity_logit(y_target[:, None], y_source[None, :], temperature)
        logits = tl.where((cols < C)[None, :], logits, float("-inf"))
        row_max = tl.maximum(row_max, tl.max(logits, axis=1))
    row_sum = tl.zeros([BLOCK_CH], tl.float32)
    for j in range(0, C, BLOCK_J):
        cols = j + tl.arange(0, BLOCK_J)
        y_source = signature(tl.load(gamma_s_ptr + cols, mask=cols < C, other=1.0),
                             tl.load(beta_s_ptr + cols, mask=cols < C, other=0.0), eps)
        logits = affinity_logit(y_target[:, None], y_source[None, :], temperature)
        terms = tl.exp(logits - row_max[:, None])
        row_sum += tl.sum(tl.where((cols < C)[None, :], terms, 0.0), axis=1)
    return row_max, row_sum


@triton.jit
def _non_finite(v):
    """1 where ``v`` is NaN or infinite, else 0."""
    return ((v != v) | (tl.abs(v) == float("inf"))).to(tl.int32)


@triton.jit
def finalise_forward_kernel(
    partials_ptr, num_splits, x_ptr, pilot_stride, gamma_s_ptr, beta_s_ptr, gamma_t_ptr, beta_t_ptr,
    given_centre_ptr, given_mean_rel_ptr, given_var_ptr, running_mean_ptr, running_var_ptr,
    mean_ptr, invstd_ptr, new_mean_ptr, new_var_ptr, aux_ptr, status_ptr,
    C, count, momentum, eps, temperature,
    BATCH_STATS: tl.constexpr, HAS_MEAN_REL: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    STATUS: tl.constexpr, BLOCK_CH: tl.constexpr, BLOCK_SPLIT: tl.constexpr, BLOCK_J: tl.constexpr,
):
    channels = tl.program_id(0) * BLOCK_CH + tl.arange(0, BLOCK_CH)
    channel_mask = channels < C
    if BATCH_STATS:
        splits = tl.arange(0, BLOCK_SPLIT)
        mask = channel_mask[:, None] & (splits < num_splits)[None, :]
        offsets = channels[:, None] * num_splits + splits[None, :]
        plane = C * num_splits
        part_n = tl.load(partials_ptr + offsets, mask=mask, other=0.0)
        part_mean = tl.load(partials_ptr + plane + offsets, mask=mask, other=0.0)
        part_m2 = tl.load(partials_ptr + 2 * plane + offsets, mask=mask, other=0.0)
        _, centre_lo, m2 = tl.reduce((part_n, part_mean, part_m2), 1, chan_merge)
        centre_hi = tl.load(x_ptr + channels.to(tl.int64) * pilot_stride, mask=channel_mask,
                            other=0.0).to(tl.float32)
        var = m2 / count
    else:
        centre_hi = tl.load(given_centre_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
        var = tl.load(given_var_ptr + channels, mask=channel_mask, other=1.0).to(tl.float32)
        if HAS_MEAN_REL:
            centre_lo = tl.load(given_mean_rel_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
        else:
            centre_lo = tl.zeros([BLOCK_CH], tl.float32)
    mean = centre_hi + centre_lo
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + channels, mean, mask=channel_mask)
    tl.store(invstd_ptr + channels, invstd, mask=channel_mask)

    # Row c of S and the effective affine. Every program reads all four
    # affines, so each one knows whether all are finite.
    gamma_t = tl.load(gamma_t_ptr + channels, mask=channel_mask, other=1.0)
    beta_t = tl.load(beta_t_ptr + channels, mask=channel_mask, other=0.0)
    y_target = signature(gamma_t, beta_t, eps)
    y_source_own = signature(tl.load(gamma_s_ptr + channels, mask=channel_mask, other=1.0),
                             tl.load(beta_s_ptr + channels, mask=channel_mask, other=0.0), eps)
    row_max, row_sum = _softmax_normalisers(y_target, gamma_s_ptr, beta_s_ptr, C, eps, temperature,
                                            BLOCK_CH, BLOCK_J)
    w_eff = gamma_t
    b_eff = beta_t
    bad_gamma_s = tl.zeros([BLOCK_J], tl.int32)
    bad_beta_s = tl.zeros([BLOCK_J], tl.int32)
    bad_gamma_t = tl.zeros([BLOCK_J], tl.int32)
    bad_beta_t = tl.zeros([BLOCK_J], tl.int32)
    for j in range(0, C, BLOCK_J):
        cols = j + tl.arange(0, BLOCK_J)
        col_mask = cols < C
        gamma_s_cols = tl.load(gamma_s_ptr + cols, mask=col_mask, other=1.0)
        beta_s_cols = tl.load(beta_s_ptr + cols, mask=col_mask, other=0.0)
        y_source = signature(gamma_s_cols, beta_s_cols, eps)
        a = affinity(y_target[:, None], y_source[None, :], row_max[:, None], row_sum[:, None], temperature)
        kept = kept_in_s(y_target[:, None], y_source[None, :], y_source_own[:, None])
        s = tl.where(col_mask[None, :] & kept, a, 0.0)
        gamma_cols = tl.load(gamma_t_ptr + cols, mask=col_mask, other=0.0)
        beta_cols = tl.load(beta_t_ptr + cols, mask=col_mask, other=0.0)
        w_eff += tl.sum(s * gamma_cols[None, :], axis=1)
        b_eff += tl.sum(s * beta_cols[None, :], axis=1)
        if STATUS:  # masked-out columns loaded finite values
            bad_gamma_s = tl.maximum(bad_gamma_s, _non_finite(gamma_s_cols))
            bad_beta_s = tl.maximum(bad_beta_s, _non_finite(beta_s_cols))
            bad_gamma_t = tl.maximum(bad_gamma_t, _non_finite(gamma_cols))
            bad_beta_t = tl.maximum(bad_beta_t, _non_finite(beta_cols))
    update_mask = channel_mask
    if STATUS:
        status = (tl.max(bad_gamma_s, axis=0) * NON_FINITE_GAMMA_S + tl.max(bad_beta_s, axis=0) * NON_FINITE_BETA_S
                  + tl.max(bad_gamma_t, axis=0) * NON_FINITE_GAMMA_T
                  + tl.max(bad_beta_t, axis=0) * NON_FINITE_BETA_T)
        if tl.program_id(0) == 0:
            tl.store(status_ptr, status)
        # A refused call leaves the running statistics as they were.
        update_mask = channel_mask & ((status + tl.zeros([BLOCK_CH], tl.int32)) == 0)
    if UPDATE_RUNNING:
        old_mean = tl.load(running_mean_ptr + channels, mask=channel_mask).to(tl.float32)
        old_var = tl.load(running_var_ptr + channels, mask=channel_mask).to(tl.float32)
        unbiased = var * (count / (count - 1.0))
        tl.store(new_mean_ptr + channels, old_mean + momentum * (mean - old_mean), mask=update_mask)
        tl.store(new_var_ptr + channels, old_var + momentum * (unbiased - old_var), mask=update_mask)
    tl.store(aux_ptr + AUX_SCALE * C + channels, w_eff * invstd, mask=channel_mask)
    tl.store(aux_ptr + AUX_SHIFT_B * C + channels, b_eff, mask=channel_mask)
    tl.store(aux_ptr + AUX_CENTRE_HI * C + channels, centre_hi, mask=channel_mask)
    tl.store(aux_ptr + AUX_CENTRE_LO * C + channels, centre_lo, mask=channel_mask)
    tl.store(aux_ptr + AUX_SOURCE_SIG * C + channels, y_source_own, mask=channel_mask)
    tl.store(aux_ptr + AUX_TARGET_SIG * C + channels, y_target, mask=channel_mask)
    tl.store(aux_ptr + AUX_ROW_MAX * C + channels, row_max, mask=channel_mask)
    tl.store(aux_ptr + AUX_ROW_SUM * C + channels, row_sum, mask=channel_mask)


@triton.jit
def finalise_backward_kernel(
    partials_ptr, num_splits, global_sums_ptr, invstd_ptr, aux_ptr, grad_affine_ptr, coef_ptr,
    C, count,
    BATCH_STATS: tl.constexpr, HAS_GLOBAL: tl.constexpr, BLOCK_CH: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
):
    channels = tl.program_id(0) * BLOCK_CH + tl.arange(0, BLOCK_CH)
    channel_mask = channels < C
    splits = tl.arange(0, BLOCK_SPLIT)
    mask = channel_mask[:, None] & (splits < num_splits)[None, :]
    offsets = channels[:, None] * num_splits + splits[None, :]
    sum_dy = tl.sum(tl.load(partials_ptr + offsets, mask=mask, other=0.0), axis=1)
    sum_dy_xmu = tl.sum(tl.load(partials_ptr + C * num_splits + offsets, mask=mask, other=0.0), axis=1)
    invstd = tl.load(invstd_ptr + channels, mask=channel_mask, other=0.0)
    tl.store(grad_affine_ptr + channels, sum_dy_xmu * invstd, mask=channel_mask)
    tl.store(grad_affine_ptr + C + channels, sum_dy, mask=channel_mask)
    if BATCH_STATS:
        # The batch statistics depend on x: dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)),
        # the means over every value the statistics cover.
        if HAS_GLOBAL:
            sum_dy = tl.load(global_sums_ptr + channels, mask=channel_mask, other=0.0)
            sum_dy_xmu = tl.load(global_sums_ptr + C + channels, mask=channel_mask, other=0.0)
        scale = tl.load(aux_ptr + AUX_SCALE * C + channels, mask=channel_mask, other=0.0)
        p = -scale * invstd * invstd * sum_dy_xmu / count
        q = -scale * sum_dy / count
    else:
        p = tl.zeros([BLOCK_CH], tl.float32)
        q = tl.zeros([BLOCK_CH], tl.float32)
    tl.store(coef_ptr + channels, p, mask=channel_mask)
    tl.store(coef_ptr + C + channels, q, mask=channel_mask)


@triton.jit
def target_grad_kernel(
    aux_ptr, grad_affine_ptr, out_ptr, C, temperature,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    col_mask = cols < C
    y_source = tl.load(aux_ptr + AUX_SOURCE_SIG * C + cols, mask=col_mask, other=0.0)
    grad_w = tl.load(grad_affine_ptr + cols, mask=col_mask, other=0.0)
    grad_b = tl.load(grad_affine_ptr + C + cols, mask=col_mask, other=0.0)
    acc_w = grad_w
    acc_b = grad_b
    for i in range(0, C, BLOCK_I):
        rows = i + tl.arange(0, BLOCK_I)
        row_mask = rows < C
        y_source_own = tl.load(aux_ptr + AUX_SOURCE_SIG * C + rows, mask=row_mask, other=0.0)
        y_target = tl.load(aux_ptr + AUX_TARGET_SIG * C + rows, mask=row_mask, other=0.0)
        row_max = tl.load(aux_ptr + AUX_ROW_MAX * C + rows, mask=row_mask, other=0.0)
        row_sum = tl.load(aux_ptr + AUX_ROW_SUM * C + rows, mask=row_mask, other=1.0)
        a = affinity(y_target[:, None], y_source[None, :], row_max[:, None], row_sum[:, None], temperature)
        kept = kept_in_s(y_target[:, None], y_source[None, :], y_source_own[:, None])
        s = tl.where(row_mask[:, None] & col_mask[None, :] & kept, a, 0.0)
        acc_w += tl.sum(s * tl.load(grad_affine_ptr + rows, mask=row_mask, other=0.0)[:, None], axis=0)
        acc_b += tl.sum(s * tl.load(grad_affine_ptr + C + rows, mask=row_mask, other=0.0)[:, None], axis=0)
    tl.store(out_ptr + cols, acc_w, mask=col_mask)
    tl.store(out_ptr + C + cols, acc_b, mask=col_mask)
