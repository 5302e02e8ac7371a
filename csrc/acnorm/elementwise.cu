// Elementwise passes over x: the forward apply y = act(pre),
// pre = ((x - hi) - lo) * scale + B, and the backward
// dx = scale * act'(pre) * dy + p * ((x - hi) - lo) + q, one kernel per layout.
//
// Blocks run in reverse order of the reduction pass that precedes them, so
// the first tiles they touch are the last the reduction read, still in L2.

#include "channel.cuh"

namespace acnorm {
namespace {

// Packs of 16 bytes a thread of the planar kernel handles per block.
constexpr int kPlanarPacksPerThread = 4;
// Rows a thread of the interleaved kernel handles per block.
constexpr int kInterleavedRowsPerThread = 4;

// One block per tile of `tile` positions (at most kPlanarPacksPerThread packs
// per thread) of one (n, c) row; grid rows * tiles_per_row.
template <typename T, bool GRAD, int WIDTH>
__global__ void __launch_bounds__(kThreads)
elementwise_planar_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
                          const float* __restrict__ aux, const float* __restrict__ coef, int64_t C,
                          int64_t S, int64_t tile, int64_t tiles_per_row, int act, float slope) {
  const int64_t block = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int64_t row = block / tiles_per_row;  // n * C + channel
  const int64_t start = (block - row * tiles_per_row) * tile;
  const int64_t end = min(start + tile, S);
  const ChannelCoefficients k = coefficients<GRAD>(aux, coef, C, row % C);
  const int64_t base = row * S;
  // All of a thread's loads are issued before any result is computed, so
  // that each thread keeps several 16-byte requests in flight; the packs stay
  // in their storage type until used, half the registers for fp16/bf16.
  Pack<T, WIDTH> xs[kPlanarPacksPerThread], dys[kPlanarPacksPerThread];
#pragma unroll
  for (int p = 0; p < kPlanarPacksPerThread; ++p) {
    const int64_t s = start + (static_cast<int64_t>(p) * kThreads + threadIdx.x) * WIDTH;
    if (s < end) {
      xs[p] = read_pack<T, WIDTH>(x + base + s);
      if (GRAD) dys[p] = read_pack<T, WIDTH>(dy + base + s);
    }
  }
#pragma unroll
  for (int p = 0; p < kPlanarPacksPerThread; ++p) {
    const int64_t s = start + (static_cast<int64_t>(p) * kThreads + threadIdx.x) * WIDTH;
    if (s < end) {
      float result[WIDTH];
#pragma unroll
      for (int i = 0; i < WIDTH; ++i)
        result[i] = apply_one<GRAD>(to_float(xs[p].v[i]), GRAD ? to_float(dys[p].v[i]) : 0.f, k, act, slope);
      store_pack<T, WIDTH>(out + base + s, result);
    }
  }
}

// x is a row-major (R, C) matrix; one block per (row block, channel block).
template <typename T, bool GRAD, int WIDTH>
__global__ void __launch_bounds__(kThreads)
elementwise_interleaved_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
                               const float* __restrict__ aux, const float* __restrict__ coef, int64_t R,
                               int64_t C, int block_c, int act, float slope) {
  const Interleave lanes(block_c, WIDTH);
  const int64_t c_blocks = (C + block_c - 1) / block_c;
  const int64_t block = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int64_t row_block = block / c_blocks;
  const int64_t c0 = (block - row_block * c_blocks) * block_c + lanes.lane_c * WIDTH;
  if (c0 >= C) return;  // C is a multiple of WIDTH: a pack is wholly in or out
  ChannelCoefficients k[WIDTH];
#pragma unroll
  for (int i = 0; i < WIDTH; ++i) k[i] = coefficients<GRAD>(aux, coef, C, c0 + i);
  const int64_t first_row = row_block * lanes.lanes_r * kInterleavedRowsPerThread + lanes.lane_r;
  // Loads first, as in the planar kernel.
  Pack<T, WIDTH> xs[kInterleavedRowsPerThread], dys[kInterleavedRowsPerThread];
#pragma unroll
  for (int p = 0; p < kInterleavedRowsPerThread; ++p) {
    const int64_t r = first_row + static_cast<int64_t>(p) * lanes.lanes_r;
    if (r < R) {
      xs[p] = read_pack<T, WIDTH>(x + r * C + c0);
      if (GRAD) dys[p] = read_pack<T, WIDTH>(dy + r * C + c0);
    }
  }
#pragma unroll
  for (int p = 0; p < kInterleavedRowsPerThread; ++p) {
    const int64_t r = first_row + static_cast<int64_t>(p) * lanes.lanes_r;
    if (r < R) {
      float result[WIDTH];
#pragma unroll
      for (int i = 0; i < WIDTH; ++i)
        result[i] = apply_one<GRAD>(to_float(xs[p].v[i]), GRAD ? to_float(dys[p].v[i]) : 0.f, k[i], act, slope);
      store_pack<T, WIDTH>(out + r * C + c0, result);
    }
  }
}

template <typename T, int WIDTH>
cudaError_t launch_elementwise_typed(const Geometry& geo, const T* x, const T* dy, T* out, const float* aux,
                                     const float* coef, int act, float slope, cudaStream_t stream) {
  int64_t blocks;
  if (geo.planar) {
    // A tile of whole packs, no longer than the row needs.
    const int64_t step = static_cast<int64_t>(kThreads) * WIDTH;
    const int64_t tile = min(ceil_div(geo.s, step), static_cast<int64_t>(kPlanarPacksPerThread)) * step;
    const int64_t tiles_per_row = ceil_div(geo.s, tile);
    blocks = geo.n * geo.c * tiles_per_row;
    if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    if (dy != nullptr)
      launch(elementwise_planar_kernel<T, true, WIDTH>, static_cast<unsigned>(blocks), kThreads, stream,
          x, dy, out, aux, coef, geo.c, geo.s, tile, tiles_per_row, act, slope);
    else
      launch(elementwise_planar_kernel<T, false, WIDTH>, static_cast<unsigned>(blocks), kThreads, stream,
          x, dy, out, aux, coef, geo.c, geo.s, tile, tiles_per_row, act, slope);
  } else {
    const int block_c = static_cast<int>(geo.block_c);
    const int64_t rows_per_block = static_cast<int64_t>(kThreads / (block_c / WIDTH)) * kInterleavedRowsPerThread;
    blocks = ceil_div(geo.n * geo.s, rows_per_block) * ceil_div(geo.c, geo.block_c);
    if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    if (dy != nullptr)
      launch(elementwise_interleaved_kernel<T, true, WIDTH>, static_cast<unsigned>(blocks), kThreads, stream,
          x, dy, out, aux, coef, geo.n * geo.s, geo.c, block_c, act, slope);
    else
      launch(elementwise_interleaved_kernel<T, false, WIDTH>, static_cast<unsigned>(blocks), kThreads, stream,
          x, dy, out, aux, coef, geo.n * geo.s, geo.c, block_c, act, slope);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_elementwise(const Geometry& geo, DType dtype, const void* x, const void* dy, void* out,
                               const float* aux, const float* coef, int activation, float slope,
                               cudaStream_t stream) {
  if (geo.block_c > 64) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = pack_width<T>();
    const bool aligned = is_aligned16(x) && is_aligned16(out) && (dy == nullptr || is_aligned16(dy));
    const bool whole_packs = geo.planar ? geo.s % W == 0 : geo.c % W == 0 && geo.block_c % W == 0;
    const T* xt = static_cast<const T*>(x);
    const T* dyt = static_cast<const T*>(dy);
    T* outt = static_cast<T*>(out);
    if (aligned && whole_packs)
      return launch_elementwise_typed<T, W>(geo, xt, dyt, outt, aux, coef, activation, slope, stream);
    return launch_elementwise_typed<T, 1>(geo, xt, dyt, outt, aux, coef, activation, slope, stream);
  });
}

}  // namespace acnorm
