// Per-channel steps that the finalise, elementwise and single-pass kernels
// share: a row of the correlation S with the effective affine it gives, a
// column of (I + S)^T, the running statistics' move, the coefficients of dx,
// a channel's constants from aux, one value's terms of the gradient sums, and
// y or dx of one value.
#pragma once

#include "common.cuh"

namespace acnorm {

// The four affines, C values each.
struct Affines {
  const float* gamma_s;
  const float* beta_s;
  const float* gamma_t;
  const float* beta_t;
};

// Row c of S and what it gives: W_c - gamma_t[c] = sum_j S[c, j] gamma_t[j]
// (w_sum), B_c alike, the softmax's normalisers, and which affines hold a
// NaN or an infinity anywhere (NonFinite bits: the row reads them all).
struct CorrelationRow {
  float y_target, y_source_own, row_max, row_sum, w_sum, b_sum;
  int non_finite;
};

__device__ __forceinline__ float source_signature(const Affines& a, int64_t j, float eps) {
  return signature(a.gamma_s[j], a.beta_s[j], eps);
}

__device__ __forceinline__ int non_finite_bits(const Affines& a, int64_t j) {
  return (is_finite(a.gamma_s[j]) ? 0 : kSourceWeight) | (is_finite(a.beta_s[j]) ? 0 : kSourceBias) |
         (is_finite(a.gamma_t[j]) ? 0 : kTargetWeight) | (is_finite(a.beta_t[j]) ? 0 : kTargetBias);
}

// One warp computes row c; every lane gets the result.
__device__ __forceinline__ CorrelationRow correlation_row(const Affines& a, int64_t C, int64_t c, float eps,
                                                          float temperature, int lane) {
  CorrelationRow row;
  row.y_target = signature(a.gamma_t[c], a.beta_t[c], eps);
  row.y_source_own = source_signature(a, c, eps);
  float row_max = -INFINITY;
  int non_finite = 0;
  for (int64_t j = lane; j < C; j += kWarpSize) {
    row_max = fmaxf(row_max, affinity_logit(row.y_target, source_signature(a, j, eps), temperature));
    non_finite |= non_finite_bits(a, j);
  }
  row.row_max = warp_max(row_max);
  row.non_finite = warp_or(non_finite);
  float row_sum = 0.f;
  for (int64_t j = lane; j < C; j += kWarpSize)
    row_sum += expf(affinity_logit(row.y_target, source_signature(a, j, eps), temperature) - row.row_max);
  row.row_sum = warp_sum(row_sum);
  float w_sum = 0.f, b_sum = 0.f;
  for (int64_t j = lane; j < C; j += kWarpSize) {
    const float y_source = source_signature(a, j, eps);
    const float s = kept_in_s(row.y_target, y_source, row.y_source_own)
                        ? affinity(row.y_target, y_source, row.row_max, row.row_sum, temperature) : 0.f;
    w_sum += s * a.gamma_t[j];
    b_sum += s * a.beta_t[j];
  }
  row.w_sum = warp_sum(w_sum);
  row.b_sum = warp_sum(b_sum);
  return row;
}

// The forward's aux entries of row c that need only the parameters.
__device__ __forceinline__ void store_row(float* aux, int64_t C, int64_t c, const CorrelationRow& row,
                                          float beta_t) {
  aux[kShiftB * C + c] = beta_t + row.b_sum;
  aux[kSourceSig * C + c] = row.y_source_own;
  aux[kTargetSig * C + c] = row.y_target;
  aux[kRowMax * C + c] = row.row_max;
  aux[kRowSum * C + c] = row.row_sum;
}

// ((I + S)^T g)_j - g_j for both rows of g = [dW; dB] (2, C), S recomputed
// from the normalisers in aux. One warp per column; every lane gets the result.
__device__ __forceinline__ float2 target_grad_column(const float* aux, const float* grad_affine, int64_t C,
                                                     int64_t j, float temperature, int lane) {
  const float y_source = aux[kSourceSig * C + j];
  float acc_w = 0.f, acc_b = 0.f;
  for (int64_t i = lane; i < C; i += kWarpSize) {
    const float y_target = aux[kTargetSig * C + i];
    const float s = kept_in_s(y_target, y_source, aux[kSourceSig * C + i])
                        ? affinity(y_target, y_source, aux[kRowMax * C + i], aux[kRowSum * C + i], temperature)
                        : 0.f;
    acc_w += s * grad_affine[i];
    acc_b += s * grad_affine[C + i];
  }
  return make_float2(warp_sum(acc_w), warp_sum(acc_b));
}

// Moves channel c's running statistics towards the batch's mean and (biased)
// variance of `count` values; the same thread reads and writes, so in place.
__device__ __forceinline__ void move_running(const float* running_mean, const float* running_var,
                                             float* new_mean, float* new_var, int64_t c, float mean, float var,
                                             float count, float momentum) {
  const float unbiased = var * (count / (count - 1.f));
  new_mean[c] = running_mean[c] + momentum * (mean - running_mean[c]);
  new_var[c] = running_var[c] + momentum * (unbiased - running_var[c]);
}

// p and q of dx = scale * dy + p * (x - mean) + q, from the channel's sums
// of dy and dy * (x - mean).
__device__ __forceinline__ float2 dx_coefficients(float sum_dy, float sum_dy_xmu, float invstd, float scale,
                                                  float count, bool batch_stats) {
  // The batch statistics depend on x: dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)),
  // the means over every value the statistics cover.
  if (!batch_stats) return make_float2(0.f, 0.f);
  return make_float2(-scale * invstd * invstd * sum_dy_xmu / count, -scale * sum_dy / count);
}

// A channel's constants in the passes that write y or dx: the scale W * invstd,
// B, the centre hi + lo, and dx's coefficients p and q.
struct ChannelCoefficients {
  float scale, bias, hi, lo, p, q;
};

// Channel c's constants from the forward's aux rows, and (GRAD) dx's p and q
// from coef (2, C); else p = q = 0.
template <bool GRAD>
__device__ __forceinline__ ChannelCoefficients coefficients(const float* aux, const float* coef, int64_t C,
                                                            int64_t channel) {
  ChannelCoefficients k;
  k.scale = aux[kScale * C + channel];
  k.bias = aux[kShiftB * C + channel];
  k.hi = aux[kCentreHi * C + channel];
  k.lo = aux[kCentreLo * C + channel];
  k.p = GRAD ? coef[channel] : 0.f;
  k.q = GRAD ? coef[C + channel] : 0.f;
  return k;
}

// Adds one value to a channel's gradient sums: dy through the activation's
// derivative (sum_dy), and that times x - mean (sum_dy_xmu).
__device__ __forceinline__ void add_grad_sums(float x, float dy, const ChannelCoefficients& k, int act, float slope,
                                              float& sum_dy, float& sum_dy_xmu) {
  const float centred = (x - k.hi) - k.lo;
  const float grad = activation_grad(dy, centred * k.scale + k.bias, act, slope);
  sum_dy += grad;
  sum_dy_xmu += grad * centred;
}

// y = act(pre), pre = ((x - hi) - lo) * scale + B; or (GRAD)
// dx = scale * act'(pre) * dy + p * ((x - hi) - lo) + q.
template <bool GRAD>
__device__ __forceinline__ float apply_one(float x, float dy, const ChannelCoefficients& k, int act,
                                           float slope) {
  const float centred = (x - k.hi) - k.lo;
  const float pre = centred * k.scale + k.bias;
  if (GRAD) return k.scale * activation_grad(dy, pre, act, slope) + k.p * centred + k.q;
  return activate(pre, act, slope);
}

}  // namespace acnorm
