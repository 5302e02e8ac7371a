// Per-channel reduction passes over x: the training statistics (forward) and
// the two gradient sums (backward), one kernel per layout.
//
// Each block reduces one chunk of one channel (planar) or of a block of
// channels (interleaved) in fp32 and writes its partial result to
// partials[k][channel][split]; the finalise kernels merge the partials of a
// channel in a fixed order, so results do not depend on scheduling. The
// statistics accumulate x - K, K the channel's first value: with a large mean
// and a small spread (CT intensities) a running mean of raw x would round at
// the scale of the mean, while x - K is exact and small.

#include "channel.cuh"

namespace acnorm {
namespace {

// Two blocks per SM at least: without this hint ptxas spilled a few values
// of the gradient passes on sm_80 and sm_120 to keep more blocks resident.
constexpr int kMinBlocks = 2;

// The per-channel values a pass reads: the centring pilot K for the
// statistics; scale, B and the centre for the gradient sums.
struct ChannelConstants {
  float pilot = 0.f;
  ChannelCoefficients grad{};
};

template <typename T, bool GRAD>
__device__ __forceinline__ ChannelConstants channel_constants(const T* x, const float* aux, int64_t C,
                                                              int64_t channel, int64_t pilot_offset) {
  ChannelConstants k;
  if (GRAD)
    k.grad = coefficients<false>(aux, nullptr, C, channel);
  else
    k.pilot = read_value(x + pilot_offset);
  return k;
}

// Adds one pack of values to a thread's gradient sums.
template <int WIDTH>
__device__ __forceinline__ void add_grad(const float (&v)[WIDTH], const float (&g)[WIDTH],
                                         const ChannelConstants& k, int act, float slope,
                                         float& sum_dy, float& sum_dy_xmu) {
#pragma unroll
  for (int i = 0; i < WIDTH; ++i) add_grad_sums(v[i], g[i], k.grad, act, slope, sum_dy, sum_dy_xmu);
}

// Block-wide reductions; the result is valid in thread 0.
__device__ Moments block_merge(Moments m) {
  __shared__ Moments warp_results[kThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  m = warp_merge(m);
  if (lane == 0) warp_results[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < kThreads / kWarpSize ? warp_results[lane] : Moments{0.f, 0.f, 0.f};
    m = warp_merge(m);
  }
  return m;
}

__device__ float2 block_sum2(float a, float b) {
  __shared__ float2 warp_results[kThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) warp_results[warp] = make_float2(a, b);
  __syncthreads();
  if (warp == 0) {
    const float2 r = lane < kThreads / kWarpSize ? warp_results[lane] : make_float2(0.f, 0.f);
    a = warp_sum(r.x);
    b = warp_sum(r.y);
  }
  return make_float2(a, b);
}

// Grid (C, split_s, split_n); WIDTH consecutive positions per access.
template <typename T, bool GRAD, int WIDTH>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
reduce_planar_kernel(const T* __restrict__ x, const T* __restrict__ dy, float* __restrict__ partials,
                     const float* __restrict__ aux, int64_t N, int64_t C, int64_t S, int64_t n_chunk,
                     int64_t s_chunk, int act, float slope) {
  const int64_t channel = blockIdx.x;
  const int64_t num_splits = static_cast<int64_t>(gridDim.y) * gridDim.z;
  const int64_t split = static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
  const int64_t s_start = blockIdx.y * s_chunk;
  const int64_t s_end = min(s_start + s_chunk, S);
  const int64_t n_start = blockIdx.z * n_chunk;
  const int64_t n_end = min(n_start + n_chunk, N);
  const ChannelConstants k = channel_constants<T, GRAD>(x, aux, C, channel, channel * S);
  Moments moments{0.f, 0.f, 0.f};
  float sum_dy = 0.f, sum_dy_xmu = 0.f;
  for (int64_t n = n_start; n < n_end; ++n) {
    const int64_t row = (n * C + channel) * S;
    // Chunk bounds are multiples of WIDTH: every access is whole. Unrolled so
    // that several 16-byte loads per thread are in flight.
#pragma unroll 4
    for (int64_t s = s_start + threadIdx.x * WIDTH; s < s_end; s += kThreads * WIDTH) {
      float v[WIDTH];
      load_pack<T, WIDTH>(x + row + s, v);
      if (GRAD) {
        float g[WIDTH];
        load_pack<T, WIDTH>(dy + row + s, g);
        add_grad(v, g, k, act, slope, sum_dy, sum_dy_xmu);
      } else {
#pragma unroll
        for (int i = 0; i < WIDTH; ++i) v[i] -= k.pilot;
        moments = merge(moments, pack_moments(v));
      }
    }
  }
  float* out = partials + channel * num_splits + split;
  const int64_t plane = C * num_splits;
  if (GRAD) {
    const float2 sums = block_sum2(sum_dy, sum_dy_xmu);
    if (threadIdx.x == 0) {
      out[0] = sums.x;
      out[plane] = sums.y;
    }
  } else {
    moments = block_merge(moments);
    if (threadIdx.x == 0) {
      out[0] = moments.n;
      out[plane] = moments.mean;
      out[2 * plane] = moments.m2;
    }
  }
}

// Grid (ceil(C / block_c), splits); x is a row-major (R, C) matrix. A thread
// owns WIDTH consecutive channels and walks every lanes_r-th row of its chunk.
template <typename T, bool GRAD, int WIDTH>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
reduce_interleaved_kernel(const T* __restrict__ x, const T* __restrict__ dy, float* __restrict__ partials,
                          const float* __restrict__ aux, int64_t R, int64_t C, int64_t r_chunk, int block_c,
                          int act, float slope) {
  // Per-lane results, (lanes_r, block_c) of them, for the merge across rows.
  __shared__ float shared_a[kThreads * 8];
  __shared__ float shared_b[kThreads * 8];
  __shared__ float shared_n[kThreads];
  const Interleave lanes(block_c, WIDTH);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * block_c;
  const int64_t c0 = first + lanes.lane_c * WIDTH;
  const bool active = c0 < C;  // C is a multiple of WIDTH: a pack is wholly in or out
  const int64_t split = blockIdx.y, num_splits = gridDim.y;
  const int64_t r_start = split * r_chunk;
  const int64_t r_end = min(r_start + r_chunk, R);
  ChannelConstants k[WIDTH];
  float count = 0.f, acc_a[WIDTH], acc_b[WIDTH];
#pragma unroll
  for (int i = 0; i < WIDTH; ++i) {
    acc_a[i] = acc_b[i] = 0.f;
    if (active) k[i] = channel_constants<T, GRAD>(x, aux, C, c0 + i, c0 + i);  // row 0 holds the pilots
  }
  if (active) {
    // Each step already holds WIDTH channels' state; two steps in flight suffice.
#pragma unroll 2
    for (int64_t r = r_start + lanes.lane_r; r < r_end; r += lanes.lanes_r) {
      float v[WIDTH];
      load_pack<T, WIDTH>(x + r * C + c0, v);
      if (GRAD) {
        float g[WIDTH];
        load_pack<T, WIDTH>(dy + r * C + c0, g);
#pragma unroll
        for (int i = 0; i < WIDTH; ++i) add_grad_sums(v[i], g[i], k[i].grad, act, slope, acc_a[i], acc_b[i]);
      } else {
        // Welford per channel; the count, hence its reciprocal, is shared by the pack.
        count += 1.f;
        const float inv = __frcp_rn(count);
#pragma unroll
        for (int i = 0; i < WIDTH; ++i) {
          const float centred = v[i] - k[i].pilot;
          const float delta = centred - acc_a[i];
          acc_a[i] += delta * inv;
          acc_b[i] += delta * (centred - acc_a[i]);
        }
      }
    }
  }
  if (active) {
#pragma unroll
    for (int i = 0; i < WIDTH; ++i) {
      const int slot = lanes.lane_r * block_c + lanes.lane_c * WIDTH + i;
      shared_a[slot] = acc_a[i];
      shared_b[slot] = acc_b[i];
    }
    if (lanes.lane_c == 0) shared_n[lanes.lane_r] = count;
  }
  __syncthreads();
  const int64_t channel = first + threadIdx.x;
  if (threadIdx.x < block_c && channel < C) {
    float* out = partials + channel * num_splits + split;
    const int64_t plane = C * num_splits;
    if (GRAD) {
      float a = 0.f, b = 0.f;
      for (int lane_r = 0; lane_r < lanes.lanes_r; ++lane_r) {
        a += shared_a[lane_r * block_c + threadIdx.x];
        b += shared_b[lane_r * block_c + threadIdx.x];
      }
      out[0] = a;
      out[plane] = b;
    } else {
      Moments m{0.f, 0.f, 0.f};
      for (int lane_r = 0; lane_r < lanes.lanes_r; ++lane_r)
        m = merge(m, Moments{shared_n[lane_r], shared_a[lane_r * block_c + threadIdx.x],
                             shared_b[lane_r * block_c + threadIdx.x]});
      out[0] = m.n;
      out[plane] = m.mean;
      out[2 * plane] = m.m2;
    }
  }
}

template <typename T, int WIDTH>
void launch_reduce_typed(const Geometry& geo, const T* x, const T* dy, float* partials, const float* aux,
                         int act, float slope, cudaStream_t stream) {
  if (geo.planar) {
    const dim3 grid(static_cast<unsigned>(geo.c), static_cast<unsigned>(geo.split_s),
                    static_cast<unsigned>(geo.split_n));
    if (dy != nullptr)
      launch(reduce_planar_kernel<T, true, WIDTH>, grid, kThreads, stream,
          x, dy, partials, aux, geo.n, geo.c, geo.s, geo.n_chunk, geo.s_chunk, act, slope);
    else
      launch(reduce_planar_kernel<T, false, WIDTH>, grid, kThreads, stream,
          x, dy, partials, aux, geo.n, geo.c, geo.s, geo.n_chunk, geo.s_chunk, act, slope);
  } else {
    const dim3 grid(static_cast<unsigned>(ceil_div(geo.c, geo.block_c)), static_cast<unsigned>(geo.splits));
    const int block_c = static_cast<int>(geo.block_c);
    if (dy != nullptr)
      launch(reduce_interleaved_kernel<T, true, WIDTH>, grid, kThreads, stream,
          x, dy, partials, aux, geo.n * geo.s, geo.c, geo.r_chunk, block_c, act, slope);
    else
      launch(reduce_interleaved_kernel<T, false, WIDTH>, grid, kThreads, stream,
          x, dy, partials, aux, geo.n * geo.s, geo.c, geo.r_chunk, block_c, act, slope);
  }
}

}  // namespace

cudaError_t launch_reduce(const Geometry& geo, DType dtype, const void* x, const void* dy, float* partials,
                          const float* aux, int activation, float slope, cudaStream_t stream) {
  if (geo.split_s > 65535 || geo.split_n > 65535 || geo.splits > 65535 || geo.block_c > 64)
    return cudaErrorInvalidConfiguration;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = pack_width<T>();
    const bool aligned = is_aligned16(x) && (dy == nullptr || is_aligned16(dy));
    const bool whole_packs = geo.planar ? geo.s % W == 0 && geo.s_chunk % W == 0
                                        : geo.c % W == 0 && geo.block_c % W == 0;
    const T* xt = static_cast<const T*>(x);
    const T* dyt = static_cast<const T*>(dy);
    if (aligned && whole_packs)
      launch_reduce_typed<T, W>(geo, xt, dyt, partials, aux, activation, slope, stream);
    else
      launch_reduce_typed<T, 1>(geo, xt, dyt, partials, aux, activation, slope, stream);
    return cudaGetLastError();
  });
}

}  // namespace acnorm
