// Per-channel steps between the passes over x.
//
// finalise_forward_kernel: one warp per channel merges the statistics partials
// (Chan's formula, fixed order) or reads given statistics (the running ones in
// eval, or moments merged across processes), moves the running statistics,
// computes the channel's row of the correlation S from y_t[c] and all of y_s
// (no C x C matrix is stored), the effective affine
// W_c = gamma_t[c] + sum_j S[c, j] gamma_t[j] (B_c alike) and the scale
// W_c * invstd_c of the apply pass, and writes aux. Given a status word, it
// also says which affines hold a NaN or an infinity, and then leaves the
// running statistics alone (the caller raises).
//
// finalise_backward_kernel: sums the gradient partials, giving dW, dB and the
// coefficients of dx = scale * dy + p * (x - mean) + q.
//
// target_grad_kernel: (I + S)^T [dW; dB], one warp per column of S, S
// recomputed from the row normalisers the forward saved.

#include "common.cuh"

namespace acnorm {
namespace {

constexpr int kWarpsPerBlock = 4;

// Source signature of channel j.
__device__ __forceinline__ float source_signature(const FinaliseForwardArgs& a, int64_t j) {
  return signature(a.gamma_s[j], a.beta_s[j], a.eps);
}

// The NonFinite bits of channel j's four affine values.
__device__ __forceinline__ int non_finite_bits(const FinaliseForwardArgs& a, int64_t j) {
  return (is_finite(a.gamma_s[j]) ? 0 : kSourceWeight) | (is_finite(a.beta_s[j]) ? 0 : kSourceBias) |
         (is_finite(a.gamma_t[j]) ? 0 : kTargetWeight) | (is_finite(a.beta_t[j]) ? 0 : kTargetBias);
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize) finalise_forward_kernel(FinaliseForwardArgs a) {
  const int64_t C = a.channels;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (c >= C) return;  // whole warps leave together

  float centre_hi, centre_lo, var;
  if (a.partials != nullptr) {
    const int64_t plane = C * a.num_splits;
    const float* part = a.partials + c * a.num_splits;
    Moments m{0.f, 0.f, 0.f};
    for (int64_t split = lane; split < a.num_splits; split += kWarpSize)
      m = merge(m, Moments{part[split], part[plane + split], part[2 * plane + split]});
    m = warp_merge(m);
    centre_hi = to_float(static_cast<const T*>(a.x)[c * a.pilot_stride]);
    centre_lo = m.mean;
    var = m.m2 / a.count;
  } else {
    centre_hi = a.given_centre[c];
    centre_lo = a.given_mean_rel != nullptr ? a.given_mean_rel[c] : 0.f;
    var = a.given_var[c];
  }
  const float mean = centre_hi + centre_lo;
  const float invstd = 1.f / sqrtf(var + a.eps);

  // Row c of the softmax: its maximum logit and exponential sum, then S's entries.
  // Every warp reads all four affines, so each one knows whether all are finite.
  const float* gamma_t = a.gamma_t;
  const float* beta_t = a.beta_t;
  const float y_target = signature(gamma_t[c], beta_t[c], a.eps);
  const float y_source_own = source_signature(a, c);
  float row_max = -INFINITY;
  int non_finite = 0;
  for (int64_t j = lane; j < C; j += kWarpSize) {
    row_max = fmaxf(row_max, affinity_logit(y_target, source_signature(a, j), a.temperature));
    non_finite |= non_finite_bits(a, j);
  }
  row_max = warp_max(row_max);
  non_finite = warp_or(non_finite);
  float row_sum = 0.f;
  for (int64_t j = lane; j < C; j += kWarpSize)
    row_sum += expf(affinity_logit(y_target, source_signature(a, j), a.temperature) - row_max);
  row_sum = warp_sum(row_sum);
  float w_sum = 0.f, b_sum = 0.f;
  for (int64_t j = lane; j < C; j += kWarpSize) {
    const float y_source = source_signature(a, j);
    const float s = kept_in_s(y_target, y_source, y_source_own)
                        ? affinity(y_target, y_source, row_max, row_sum, a.temperature) : 0.f;
    w_sum += s * gamma_t[j];
    b_sum += s * beta_t[j];
  }
  w_sum = warp_sum(w_sum);
  b_sum = warp_sum(b_sum);
  if (lane != 0) return;

  // A refused call leaves the running statistics as they were.
  const bool refused = a.status != nullptr && non_finite != 0;
  if (a.status != nullptr && c == 0) *a.status = non_finite;
  if (a.new_mean != nullptr && !refused) {
    const float unbiased = var * (a.count / (a.count - 1.f));
    a.new_mean[c] = a.running_mean[c] + a.momentum * (mean - a.running_mean[c]);
    a.new_var[c] = a.running_var[c] + a.momentum * (unbiased - a.running_var[c]);
  }
  a.mean[c] = mean;
  a.invstd[c] = invstd;
  const float w_eff = gamma_t[c] + w_sum;
  a.aux[kScale * C + c] = w_eff * invstd;
  a.aux[kShiftB * C + c] = beta_t[c] + b_sum;
  a.aux[kCentreHi * C + c] = centre_hi;
  a.aux[kCentreLo * C + c] = centre_lo;
  a.aux[kSourceSig * C + c] = y_source_own;
  a.aux[kTargetSig * C + c] = y_target;
  a.aux[kRowMax * C + c] = row_max;
  a.aux[kRowSum * C + c] = row_sum;
}

// One thread per channel; the splits are summed in order.
__global__ void finalise_backward_kernel(const float* __restrict__ partials, int64_t num_splits,
                                         const float* __restrict__ global_sums, const float* __restrict__ invstd,
                                         const float* __restrict__ aux, float* __restrict__ grad_affine,
                                         float* __restrict__ coef, int64_t C, float count, bool batch_stats) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sum_dy = 0.f, sum_dy_xmu = 0.f;
  for (int64_t split = 0; split < num_splits; ++split) {
    sum_dy += partials[c * num_splits + split];
    sum_dy_xmu += partials[(C + c) * num_splits + split];
  }
  const float inv = invstd[c];
  grad_affine[c] = sum_dy_xmu * inv;
  grad_affine[C + c] = sum_dy;
  float p = 0.f, q = 0.f;
  if (batch_stats) {
    // The batch statistics depend on x: dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)),
    // the means over every value the statistics cover.
    if (global_sums != nullptr) {
      sum_dy = global_sums[c];
      sum_dy_xmu = global_sums[C + c];
    }
    const float scale = aux[kScale * C + c];
    p = -scale * inv * inv * sum_dy_xmu / count;
    q = -scale * sum_dy / count;
  }
  coef[c] = p;
  coef[C + c] = q;
}

__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)
target_grad_kernel(const float* __restrict__ aux, const float* __restrict__ grad_affine,
                   float* __restrict__ grad_target, int64_t C, float temperature) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (j >= C) return;
  const float y_source = aux[kSourceSig * C + j];
  float acc_w = 0.f, acc_b = 0.f;
  for (int64_t i = lane; i < C; i += kWarpSize) {
    const float y_target = aux[kTargetSig * C + i];
    const float row_max = aux[kRowMax * C + i];
    const float row_sum = aux[kRowSum * C + i];
    const float s = kept_in_s(y_target, y_source, aux[kSourceSig * C + i])
                        ? affinity(y_target, y_source, row_max, row_sum, temperature) : 0.f;
    acc_w += s * grad_affine[i];
    acc_b += s * grad_affine[C + i];
  }
  acc_w = warp_sum(acc_w);
  acc_b = warp_sum(acc_b);
  if (lane == 0) {
    grad_target[j] = grad_affine[j] + acc_w;
    grad_target[C + j] = grad_affine[C + j] + acc_b;
  }
}

unsigned warp_blocks(int64_t channels) {
  return static_cast<unsigned>(ceil_div(channels, kWarpsPerBlock));
}

}  // namespace

cudaError_t launch_finalise_forward(const FinaliseForwardArgs& args, DType dtype, cudaStream_t stream) {
  if (args.channels <= 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    launch(finalise_forward_kernel<decltype(tag)>, warp_blocks(args.channels), kWarpsPerBlock * kWarpSize,
           stream, args);
    return cudaGetLastError();
  });
}

cudaError_t launch_finalise_backward(const float* partials, int64_t num_splits, const float* global_sums,
                                     const float* invstd, const float* aux, float* grad_affine, float* coef,
                                     int64_t channels, float count, bool batch_stats, cudaStream_t stream) {
  if (channels <= 0) return cudaSuccess;
  constexpr int threads = 128;
  launch(finalise_backward_kernel, static_cast<unsigned>(ceil_div(channels, threads)), threads, stream,
         partials, num_splits, global_sums, invstd, aux, grad_affine, coef, channels, count, batch_stats);
  return cudaGetLastError();
}

cudaError_t launch_target_grad(const float* aux, const float* grad_affine, float* grad_target, int64_t channels,
                               float temperature, cudaStream_t stream) {
  if (channels <= 0) return cudaSuccess;
  launch(target_grad_kernel, warp_blocks(channels), kWarpsPerBlock * kWarpSize, stream,
      aux, grad_affine, grad_target, channels, temperature);
  return cudaGetLastError();
}

}  // namespace acnorm
