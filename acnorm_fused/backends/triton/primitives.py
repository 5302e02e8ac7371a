"""Device functions shared by the kernel families: activations, Welford
accumulation, Chan's merge and the entries of the correlation matrix S."""

from __future__ import annotations

import triton
import triton.language as tl

from ..abi import ACTIVATION_CODES, AUX_ROW

# Activation codes of the ``ACT`` constexpr (numbered in ..abi).
ACT_RELU = tl.constexpr(ACTIVATION_CODES["relu"])
ACT_LEAKY_RELU = tl.constexpr(ACTIVATION_CODES["leaky_relu"])
# Rows of aux (numbered in ..abi): row r of channel c is at aux_ptr + r * C + c.
AUX_SCALE = tl.constexpr(AUX_ROW["scale"])
AUX_SHIFT_B = tl.constexpr(AUX_ROW["shift_b"])
AUX_CENTRE_HI = tl.constexpr(AUX_ROW["centre_hi"])
AUX_CENTRE_LO = tl.constexpr(AUX_ROW["centre_lo"])
AUX_SOURCE_SIG = tl.constexpr(AUX_ROW["source_sig"])
AUX_TARGET_SIG = tl.constexpr(AUX_ROW["target_sig"])
AUX_ROW_MAX = tl.constexpr(AUX_ROW["row_max"])
AUX_ROW_SUM = tl.constexpr(AUX_ROW["row_sum"])


@triton.jit
def activate(pre, slope, ACT: tl.constexpr):
    """``act(pre)``."""
    if ACT == ACT_RELU:
        return tl.where(pre > 0, pre, 0.0)
    elif ACT == ACT_LEAKY_RELU:
        return tl.where(pre > 0, pre, pre * slope)
    else:
        return pre


@triton.jit
def activation_grad(grad, pre, slope, ACT: tl.constexpr):
    """Gradient with respect to the pre-activation ``pre``, from the output gradient."""
    if ACT == ACT_RELU:
        return tl.where(pre > 0, grad, 0.0)
    elif ACT == ACT_LEAKY_RELU:
        return tl.where(pre > 0, grad, grad * slope)
    else:
        return grad


@triton.jit
def welford_step(count, mean, m2, x, mask):
    """Add ``x`` to per-lane running (count, mean, M2) where ``mask`` holds."""
    count = count + mask.to(tl.float32)
    delta = tl.where(mask, x - mean, 0.0)
    mean = mean + delta / tl.maximum(count, 1.0)
    return count, mean, m2 + delta * (x - mean)


@triton.jit
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan's formula: (count, mean, M2) of the union of two disjoint sets. Exact
    for a large mean against the spread, unlike sums of squares."""
    count = count_a + count_b
    weight_b = tl.where(count > 0, count_b / tl.maximum(count, 1.0), 0.0)
    delta = mean_b - mean_a
    return count, mean_a + delta * weight_b, m2_a + m2_b + delta * delta * count_a * weight_b


@triton.jit
def signature(weight, bias, eps):
    """Channel signature ``bias / (|weight| + eps)``."""
    return bias / (tl.abs(weight) + eps)


@triton.jit
def affinity_logit(y_target, y_source, temperature):
    """``-|y_t - y_s| / T``, rounded as the reference rounds it."""
    return tl.abs(y_target - y_source) / (-temperature)


@triton.jit
def affinity(y_target, y_source, row_max, row_sum, temperature):
    """Softmax entry ``A[i, j]`` from the row's maximum logit and exponential sum."""
    return tl.exp(affinity_logit(y_target, y_source, temperature) - row_max) / row_sum


@triton.jit
def kept_in_s(y_target, y_source, y_source_own):
    """Whether S keeps ``A[i, j]``: ``A[i, j] >= A[i, i]``, ties included.

    Decided on the distances ``|y_t[i] - y_s[j]| <= |y_t[i] - y_s[i]|``, which
    the softmax maps monotonically onto A: a subtraction rounds the same in
    every compiled context, while ``exp`` and the division may be fused and
    rounded differently where the diagonal entry and the row's entries are
    computed (comparing A itself lost entries of S on a GPU)."""
    return tl.abs(y_target - y_source) <= tl.abs(y_target - y_source_own)
