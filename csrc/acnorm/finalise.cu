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

#include "channel.cuh"

namespace acnorm {
namespace {

constexpr int kWarpsPerBlock = 4;

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
    centre_hi = read_value(static_cast<const T*>(a.x) + c * a.pilot_stride);
    centre_lo = m.mean;
    var = m.m2 / a.count;
  } else {
    centre_hi = a.given_centre[c];
    centre_lo = a.given_mean_rel != nullptr ? a.given_mean_rel[c] : 0.f;
    var = a.given_var[c];
  }
  const float mean = centre_hi + centre_lo;
  const float invstd = 1.f / sqrtf(var + a.eps);

  // Every warp reads all four affines, so each one knows whether all are finite.
  const CorrelationRow row =
      correlation_row(Affines{a.gamma_s, a.beta_s, a.gamma_t, a.beta_t}, C, c, a.eps, a.temperature, lane);
  if (lane != 0) return;

  // A refused call leaves the running statistics as they were.
  const bool refused = a.status != nullptr && row.non_finite != 0;
  if (a.status != nullptr && c == 0) *a.status = row.non_finite;
  if (a.new_mean != nullptr && !refused)
    move_running(a.running_mean, a.running_var, a.new_mean, a.new_var, c, mean, var, a.count, a.momentum);
  a.mean[c] = mean;
  a.invstd[c] = invstd;
  a.aux[kScale * C + c] = (a.gamma_t[c] + row.w_sum) * invstd;
  a.aux[kCentreHi * C + c] = centre_hi;
  a.aux[kCentreLo * C + c] = centre_lo;
  store_row(a.aux, C, c, row, a.beta_t[c]);
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
  if (global_sums != nullptr) {
    sum_dy = global_sums[c];
    sum_dy_xmu = global_sums[C + c];
  }
  const float2 pq = dx_coefficients(sum_dy, sum_dy_xmu, inv, aux[kScale * C + c], count, batch_stats);
  coef[c] = pq.x;
  coef[C + c] = pq.y;
}

__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)
target_grad_kernel(const float* __restrict__ aux, const float* __restrict__ grad_affine,
                   float* __restrict__ grad_target, int64_t C, float temperature) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (j >= C) return;
  const float2 acc = target_grad_column(aux, grad_affine, C, j, temperature, lane);
  if (lane == 0) {
    grad_target[j] = grad_affine[j] + acc.x;
    grad_target[C + j] = grad_affine[C + j] + acc.y;
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
