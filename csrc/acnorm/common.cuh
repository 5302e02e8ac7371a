// Device helpers shared by the AC-Norm kernels: element types and 16-byte
// packs, activations, Welford/Chan moments, warp reductions and the entries
// of the correlation matrix S.
#pragma once

#include <cstdint>
#include <utility>

#include "kernels.h"

#ifdef ACNORM_EMULATE
#include "emulator.h"
#else
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace acnorm {

// Threads of every streaming kernel: 8 warps.
constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements of T in one 16-byte global access.
template <typename T> __host__ __device__ constexpr int pack_width() { return 16 / static_cast<int>(sizeof(T)); }

// WIDTH consecutive elements, read or written as one access when WIDTH * sizeof(T) is 16.
template <typename T, int WIDTH>
struct alignas(sizeof(T) * WIDTH) Pack {
  T v[WIDTH];
};

template <typename T, int WIDTH>
__device__ __forceinline__ Pack<T, WIDTH> read_pack(const T* ptr) {
#ifdef ACNORM_EMULATE
  if (!emulator::aligned_access(ptr, alignof(Pack<T, WIDTH>))) return Pack<T, WIDTH>{};
  emulator::count_read(ptr, sizeof(Pack<T, WIDTH>));
#endif
  return *reinterpret_cast<const Pack<T, WIDTH>*>(ptr);
}

// One element of a streamed tensor (a channel's first value), as a float.
template <typename T>
__device__ __forceinline__ float read_value(const T* ptr) {
#ifdef ACNORM_EMULATE
  emulator::count_read(ptr, sizeof(T));
#endif
  return to_float(*ptr);
}

template <typename T, int WIDTH>
__device__ __forceinline__ void load_pack(const T* ptr, float (&out)[WIDTH]) {
  const Pack<T, WIDTH> pack = read_pack<T, WIDTH>(ptr);
#pragma unroll
  for (int k = 0; k < WIDTH; ++k) out[k] = to_float(pack.v[k]);
}

template <typename T, int WIDTH>
__device__ __forceinline__ void store_pack(T* ptr, const float (&in)[WIDTH]) {
  Pack<T, WIDTH> pack;
#pragma unroll
  for (int k = 0; k < WIDTH; ++k) pack.v[k] = from_float<T>(in[k]);
#ifdef ACNORM_EMULATE
  if (!emulator::aligned_access(ptr, alignof(Pack<T, WIDTH>))) return;
#endif
  *reinterpret_cast<Pack<T, WIDTH>*>(ptr) = pack;
}

__device__ __forceinline__ float activate(float pre, int act, float slope) {
  if (act == kRelu) return pre > 0.f ? pre : 0.f;
  if (act == kLeakyRelu) return pre > 0.f ? pre : pre * slope;
  return pre;
}

// Gradient with respect to the pre-activation, from the output gradient.
__device__ __forceinline__ float activation_grad(float grad, float pre, int act, float slope) {
  if (act == kRelu) return pre > 0.f ? grad : 0.f;
  if (act == kLeakyRelu) return pre > 0.f ? grad : grad * slope;
  return grad;
}

// Count, mean and M2 (sum of squared deviations) of a set of values.
struct Moments {
  float n;
  float mean;
  float m2;
};

// Chan's formula: the moments of the union of two disjoint sets. Exact for a
// large mean against the spread, unlike sums of squares.
__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  const float n = a.n + b.n;
  const float weight_b = n > 0.f ? b.n / n : 0.f;
  const float delta = b.mean - a.mean;
  return {n, a.mean + delta * weight_b, a.m2 + b.m2 + delta * delta * a.n * weight_b};
}

// The moments of WIDTH values, to be merged as one set.
template <int WIDTH>
__device__ __forceinline__ Moments pack_moments(const float (&v)[WIDTH]) {
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < WIDTH; ++k) sum += v[k];
  const float mean = sum * (1.f / WIDTH);
  float m2 = 0.f;
#pragma unroll
  for (int k = 0; k < WIDTH; ++k) m2 += (v[k] - mean) * (v[k] - mean);
  return {static_cast<float>(WIDTH), mean, m2};
}

__device__ __forceinline__ Moments shuffle_xor(const Moments& m, int lane_mask) {
  return {__shfl_xor_sync(kFullMask, m.n, lane_mask), __shfl_xor_sync(kFullMask, m.mean, lane_mask),
          __shfl_xor_sync(kFullMask, m.m2, lane_mask)};
}

// Butterfly reductions over a warp: every lane ends with the same result,
// and the order of operations is fixed, so results do not depend on timing.
__device__ __forceinline__ Moments warp_merge(Moments m) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) m = merge(m, shuffle_xor(m, offset));
  return m;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// The C x C correlation of SPEC section 2, entry by entry, as the Python
// module acnorm_fused.correlation and the Triton kernels compute it.

// Channel signature bias / (|weight| + eps).
__device__ __forceinline__ float signature(float weight, float bias, float eps) {
  return bias / (fabsf(weight) + eps);
}

// -|y_t - y_s| / T, rounded as the reference rounds it.
__device__ __forceinline__ float affinity_logit(float y_target, float y_source, float temperature) {
  return fabsf(y_target - y_source) / (-temperature);
}

// Softmax entry A[i, j] from the row's maximum logit and exponential sum.
__device__ __forceinline__ float affinity(float y_target, float y_source, float row_max, float row_sum,
                                          float temperature) {
  return expf(affinity_logit(y_target, y_source, temperature) - row_max) / row_sum;
}

// Whether S keeps A[i, j], i.e. A[i, j] >= A[i, i] with ties included, decided
// on the distances |y_t[i] - y_s[j]| <= |y_t[i] - y_s[i]| that the softmax maps
// monotonically onto A. A subtraction rounds alike wherever it is compiled;
// exp and the division may be contracted differently at each call site
// (comparing A itself lost entries of S in the Triton kernels on a GPU).
__device__ __forceinline__ bool kept_in_s(float y_target, float y_source, float y_source_own) {
  return fabsf(y_target - y_source) <= fabsf(y_target - y_source_own);
}

// Waits until every thread of the grid has arrived; its writes are then
// visible to all. Only in a kernel run by launch_cooperative.
__device__ __forceinline__ void grid_sync() {
#ifdef ACNORM_EMULATE
  emulator::grid_sync();
#else
  cooperative_groups::this_grid().sync();
#endif
}

// NaN and infinity compare false here: whether v is a finite number.
__device__ __forceinline__ bool is_finite(float v) { return fabsf(v) <= 3.402823466e38f; }

__device__ __forceinline__ int warp_or(int v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v |= __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

}  // namespace acnorm

namespace acnorm {

// Calls f with a value of the element type that dtype names.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Launches kernel on stream (or runs it in the host emulator); errors are
// read afterwards with cudaGetLastError.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
#ifdef ACNORM_EMULATE
  (void)stream;
  emulator::run(grid, block, [&] { kernel(std::forward<Args>(args)...); });
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
#endif
}

// Launches kernel as a cooperative launch, all of whose blocks are resident
// at once, so that they may wait for each other at grid_sync(); the launch
// is refused (cudaErrorCooperativeLaunchTooLarge, returned and cleared, and
// nothing runs) rather than hang when the grid exceeds what the GPU holds.
// Stream-ordered and capturable in a CUDA graph.
template <typename... Params, typename... Args>
cudaError_t launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                               Args&&... args) {
#ifdef ACNORM_EMULATE
  (void)stream;
  emulator::run(grid, block, [&] { kernel(std::forward<Args>(args)...); }, /*cooperative=*/true);
  return cudaGetLastError();
#else
  cudaLaunchAttribute cooperative;
  cooperative.id = cudaLaunchAttributeCooperative;
  cooperative.val.cooperative = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = &cooperative;
  config.numAttrs = 1;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (err != cudaSuccess) (void)cudaGetLastError();  // returned here, not again by the next launch's check
  return err;
#endif
}

inline bool is_aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Thread arrangement of the interleaved kernels: lanes_c threads across a
// block of block_c channels (width channels each), lanes_r rows at a time.
struct Interleave {
  int lanes_c, lanes_r, lane_c, lane_r;
  __device__ Interleave(int block_c, int width)
      : lanes_c(block_c / width), lanes_r(kThreads / (block_c / width)),
        lane_c(static_cast<int>(threadIdx.x) % (block_c / width)),
        lane_r(static_cast<int>(threadIdx.x) / (block_c / width)) {}
};

}  // namespace acnorm
