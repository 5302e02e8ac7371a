// Single-pass kernels for layers whose data the GPU holds at once: the whole
// forward, or the whole backward, in one cooperative launch.
//
// Every warp of the grid is a team that holds one tile of x (and dy) in
// registers from its first load to its last store:
//
// forward:  load the tile; its moments (two passes over the held values,
//           centred on the tile's first value) into the partials; the
//           rows of S, spread over every warp of the grid (they need only the
//           parameters); grid barrier; each team merges its channel's
//           partials in a fixed order (every team of a channel gets the same
//           result), normalises the tile it holds and writes y; the tile-0
//           team writes the channel's statistics, aux and running statistics.
// backward: load x and dy; the two gradient sums into the partials; grid
//           barrier; merge them, dW and dB, dx from the held tiles; grid
//           barrier; the columns of (I + S)^T over every warp of the grid.
//
// x is read from memory once, dy once; no float atomics, so results are
// bitwise reproducible. The grid must be resident (launch_cooperative fails
// otherwise, never hangs): the plan sizes it by resident_capacity. No shared
// memory, and no block-wide barrier: a team is a warp (see emulator.h).
// One block per multiprocessor at least (__launch_bounds__): held tiles take
// many registers, and ptxas would spill to fit more blocks.

#include "channel.cuh"

namespace acnorm {
namespace {

constexpr int kTeamsPerBlock = kResidentWarps;
static_assert(kTeamsPerBlock * kWarpSize == kThreads, "a block of the single-pass kernels is kThreads threads");

struct ForwardArgs {
  const void* x;
  void* out;
  float* partials;  // (4, C, tiles): count, mean and M2 of x - K_t, and K_t, per tile t
  float* weight;    // W_c = gamma_t[c] + sum_j S[c, j] gamma_t[j], for the teams after the barrier
  float* mean;
  float* invstd;
  float* aux;
  Affines affines;
  float* running_mean;  // read in eval (the given statistics), moved in training when update_running
  float* running_var;
  int* status;
  int64_t n, c, s, tiles;
  int lanes_c, activation;
  float slope, count, momentum, eps, temperature;
  bool batch_stats, update_running;
};

struct BackwardArgs {
  const void* x;
  const void* dy;
  void* dx;
  float* partials;  // (2, C, tiles): sums of dy and dy * (x - mean) per tile
  const float* aux;
  const float* invstd;
  float* grad_affine;  // dW, dB (2, C)
  float* grad_target;  // (I + S)^T [dW; dB] (2, C)
  int64_t n, c, s, tiles;
  int lanes_c, activation;
  float slope, count, temperature;
  bool batch_stats;
};

// Which tile a warp holds and where its packs lie. A group of channels is
// one channel (planar) or lanes_c * W consecutive ones (interleaved); the
// warps of the grid take tiles group by group. A lane holds packs of one
// channel (planar), or packs of W channels, one row each (interleaved): its
// kSlots channels.
template <bool PLANAR, int W, int PACKS>
struct Team {
  static constexpr int kSlots = PLANAR ? 1 : W;
  // 32-bit indices: covers() admits inputs of fewer than 2^31 elements, and
  // every register counts while the tiles are held.
  int lane, lanes_c, lane_c, lane_r, lanes_r;
  int group, tile, tiles, n, c, s, first;
  bool holds;   // the warp holds a tile of x (warp-uniform)
  bool active;  // the lane's channels exist
  int valid;    // packs the lane holds (the first `valid` of PACKS)

  __device__ Team(int64_t n_, int64_t c_, int64_t s_, int64_t tiles_, int lanes_c_)
      : lane(static_cast<int>(threadIdx.x) % kWarpSize), lanes_c(lanes_c_), lane_c(lane % lanes_c_),
        lane_r(lane / lanes_c_), lanes_r(kWarpSize / lanes_c_), tiles(static_cast<int>(tiles_)),
        n(static_cast<int>(n_)), c(static_cast<int>(c_)), s(static_cast<int>(s_)) {
    const int team = static_cast<int>(blockIdx.x) * kTeamsPerBlock + static_cast<int>(threadIdx.x) / kWarpSize;
    const int groups = PLANAR ? c : (c + lanes_c * W - 1) / (lanes_c * W);
    group = team / tiles;
    tile = team - group * tiles;
    holds = group < groups;
    first = PLANAR ? group : (group * lanes_c + lane_c) * W;
    active = holds && first < c;
    valid = 0;
    if (active)
      while (valid < PACKS && offset(valid) >= 0) ++valid;
  }

  // Element offset of the lane's pack k, or -1 past the end of its channels' data.
  __device__ int offset(int k) const {
    if (PLANAR) {
      // Packs of a channel in order: n runs of s / W packs each.
      const int q = (tile * PACKS + k) * kWarpSize + lane;
      const int row_packs = s / W;
      if (q >= n * row_packs) return -1;
      const int sample = q / row_packs;
      return (sample * c + group) * s + (q - sample * row_packs) * W;
    }
    const int row = (tile * PACKS + k) * lanes_r + lane_r;
    return row < n * s ? row * c + first : -1;
  }

  // The channel of slot j, and of element i of a pack.
  __device__ int channel(int j) const { return first + j; }
  static __device__ int slot(int i) { return PLANAR ? 0 : i; }

  // Whether this lane writes the per-channel results of its slots.
  __device__ bool reports() const { return active && lane_r == 0; }
  __device__ bool owner() const { return reports() && tile == 0; }

  // The tile's first value of each slot's channel, from the lane that holds
  // it (pack 0 of lane_c): the centre of the tile's moments, read with it.
  template <typename T>
  __device__ void centres(const Pack<T, W> (&held)[PACKS], float (&out)[kSlots]) const {
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const float own = valid > 0 ? to_float(held[0].v[j]) : 0.f;
      out[j] = __shfl_sync(kFullMask, own, lane_c);
    }
  }

  template <typename T>
  __device__ void load(const T* p, Pack<T, W> (&held)[PACKS]) const {
#pragma unroll
    for (int k = 0; k < PACKS; ++k)
      if (k < valid) held[k] = read_pack<T, W>(p + offset(k));
  }

  // y (or, GRAD, dx) of the held tile into out, with each slot's constants.
  template <bool GRAD, typename T>
  __device__ void store(T* out, const Pack<T, W> (&x)[PACKS], const Pack<T, W> (&dy)[PACKS],
                        const ChannelCoefficients (&k)[kSlots], int act, float slope) const {
#pragma unroll
    for (int p = 0; p < PACKS; ++p)
      if (p < valid) {
        float result[W];
#pragma unroll
        for (int i = 0; i < W; ++i)
          result[i] = apply_one<GRAD>(to_float(x[p].v[i]), GRAD ? to_float(dy[p].v[i]) : 0.f, k[slot(i)], act,
                                      slope);
        store_pack<T, W>(out + offset(p), result);
      }
  }

  // Merged over the lanes that hold the same channels (all of them, when
  // planar), in a fixed butterfly order; valid in the lanes that report.
  __device__ Moments across_rows(Moments m) const {
    for (int step = kWarpSize / 2; step >= lanes_c; step /= 2) m = merge(m, shuffle_xor(m, step));
    return m;
  }
  __device__ float across_rows(float v) const {
    for (int step = kWarpSize / 2; step >= lanes_c; step /= 2) v += __shfl_xor_sync(kFullMask, v, step);
    return v;
  }
};

// Makes the compiler forget what it knows of a held pack's values, so that
// code after a grid barrier converts them from their storage type again
// instead of keeping every value converted to fp32 across the barrier (twice
// the registers for fp16 and bf16).
template <typename T, int W, int PACKS>
__device__ __forceinline__ void forget(Pack<T, W> (&held)[PACKS]) {
#ifndef ACNORM_EMULATE
#pragma unroll
  for (int k = 0; k < PACKS; ++k) {
    auto* words = reinterpret_cast<unsigned*>(&held[k]);
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(Pack<T, W>) / 4); ++i) asm volatile("" : "+r"(words[i]));
  }
#else
  (void)held;
#endif
}

// The warps of the whole grid, for work spread over channels.
__device__ __forceinline__ int64_t grid_warp() {
  return static_cast<int64_t>(blockIdx.x) * kTeamsPerBlock + threadIdx.x / kWarpSize;
}
__device__ __forceinline__ int64_t grid_warps() { return static_cast<int64_t>(gridDim.x) * kTeamsPerBlock; }

template <typename T, bool PLANAR, int PACKS, int W>
__global__ void __launch_bounds__(kThreads, 1) resident_forward_kernel(ForwardArgs a) {
  using Lanes = Team<PLANAR, W, PACKS>;
  constexpr int kSlots = Lanes::kSlots;
  const Lanes team(a.n, a.c, a.s, a.tiles, a.lanes_c);
  const int64_t C = a.c;
  const T* x = static_cast<const T*>(a.x);
  Pack<T, W> held[PACKS];
  team.load(x, held);

  // Each tile's moments are centred on its first value K_t (large-mean CT
  // data: x - K_t is exact and small), shifted to the channel's K_0 at the merge.
  const int64_t plane = C * a.tiles;
  if (a.batch_stats) {
    float centre[kSlots];
    team.centres(held, centre);
    // Two passes over the held values: their mean, then M2 about it.
    float count = 0.f, sum[kSlots], m2[kSlots];
#pragma unroll
    for (int j = 0; j < kSlots; ++j) sum[j] = m2[j] = 0.f;
#pragma unroll
    for (int k = 0; k < PACKS; ++k)
      if (k < team.valid) {
        count += PLANAR ? W : 1;
#pragma unroll
        for (int i = 0; i < W; ++i) sum[Lanes::slot(i)] += to_float(held[k].v[i]) - centre[Lanes::slot(i)];
      }
    const float inv = count > 0.f ? 1.f / count : 0.f;
#pragma unroll
    for (int k = 0; k < PACKS; ++k)
      if (k < team.valid) {
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const int j = Lanes::slot(i);
          const float d = to_float(held[k].v[i]) - centre[j] - sum[j] * inv;
          m2[j] += d * d;
        }
      }
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const Moments m = team.across_rows(Moments{count, sum[j] * inv, m2[j]});
      if (team.reports()) {
        float* out = a.partials + team.channel(j) * a.tiles + team.tile;
        out[0] = m.n;
        out[plane] = m.mean;
        out[2 * plane] = m.m2;
        out[3 * plane] = centre[j];
      }
    }
  }

  // Rows of S, one warp each, over the whole grid.
  const int lane = team.lane;
  for (int64_t row_c = grid_warp(); row_c < C; row_c += grid_warps()) {
    const CorrelationRow row = correlation_row(a.affines, C, row_c, a.eps, a.temperature, lane);
    if (lane == 0) {
      store_row(a.aux, C, row_c, row, a.affines.beta_t[row_c]);
      a.weight[row_c] = a.affines.gamma_t[row_c] + row.w_sum;
      if (row_c == 0 && a.status != nullptr) *a.status = row.non_finite;
    }
  }

  grid_sync();
  if (!team.holds) return;
  forget(held);

  // A refused call (non-finite affines) leaves the running statistics as they were.
  const bool refused = a.status != nullptr && *a.status != 0;
  ChannelCoefficients k[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    k[j] = ChannelCoefficients{0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (!team.active) continue;
    const int64_t ch = team.channel(j);
    float var;
    if (a.batch_stats) {
      const float* part = a.partials + ch * a.tiles;
      const float* centre = part + 3 * plane;
      Moments m{0.f, 0.f, 0.f};
      for (int64_t t = 0; t < a.tiles; ++t)
        m = merge(m, Moments{part[t], (centre[t] - centre[0]) + part[plane + t], part[2 * plane + t]});
      k[j].hi = centre[0];
      k[j].lo = m.mean;
      var = m.m2 / a.count;
    } else {
      k[j].hi = a.running_mean[ch];
      var = a.running_var[ch];
    }
    const float invstd = 1.f / sqrtf(var + a.eps);
    k[j].scale = a.weight[ch] * invstd;
    k[j].bias = a.aux[kShiftB * C + ch];
    if (team.owner()) {
      const float mean = k[j].hi + k[j].lo;
      if (a.update_running && !refused)
        move_running(a.running_mean, a.running_var, a.running_mean, a.running_var, ch, mean, var, a.count,
                     a.momentum);
      a.mean[ch] = mean;
      a.invstd[ch] = invstd;
      a.aux[kScale * C + ch] = k[j].scale;
      a.aux[kCentreHi * C + ch] = k[j].hi;
      a.aux[kCentreLo * C + ch] = k[j].lo;
    }
  }
  team.template store<false>(static_cast<T*>(a.out), held, held, k, a.activation, a.slope);
}

// Two blocks per multiprocessor for the planar 8-pack vector variants: they fit 128
// registers without spilling on sm_90, and the deep stages of a 3D U-Net
// (e.g. (2, 256, 16^3) fp32, 256 blocks) need twice an H100's 132.
template <typename T, bool PLANAR, int PACKS, int W>
__global__ void __launch_bounds__(kThreads, PLANAR && PACKS == 8 && W > 1 ? 2 : 1)
resident_backward_kernel(BackwardArgs a) {
  using Lanes = Team<PLANAR, W, PACKS>;
  constexpr int kSlots = Lanes::kSlots;
  const Lanes team(a.n, a.c, a.s, a.tiles, a.lanes_c);
  const int64_t C = a.c;
  Pack<T, W> held_x[PACKS], held_dy[PACKS];
  team.load(static_cast<const T*>(a.x), held_x);
  team.load(static_cast<const T*>(a.dy), held_dy);

  ChannelCoefficients k[kSlots];
  float sum_dy[kSlots], sum_dy_xmu[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    k[j] = ChannelCoefficients{0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    sum_dy[j] = sum_dy_xmu[j] = 0.f;
    if (team.active) k[j] = coefficients<false>(a.aux, nullptr, C, team.channel(j));
  }
#pragma unroll
  for (int p = 0; p < PACKS; ++p)
    if (p < team.valid) {
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const int j = Lanes::slot(i);
        add_grad_sums(to_float(held_x[p].v[i]), to_float(held_dy[p].v[i]), k[j], a.activation, a.slope, sum_dy[j],
                      sum_dy_xmu[j]);
      }
    }
  const int64_t plane = C * a.tiles;
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    const float total_dy = team.across_rows(sum_dy[j]);
    const float total_dy_xmu = team.across_rows(sum_dy_xmu[j]);
    if (team.reports()) {
      float* out = a.partials + team.channel(j) * a.tiles + team.tile;
      out[0] = total_dy;
      out[plane] = total_dy_xmu;
    }
  }

  grid_sync();
  if (team.holds) {
    forget(held_x);
    forget(held_dy);
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      if (!team.active) continue;
      const int64_t ch = team.channel(j);
      const float* part = a.partials + ch * a.tiles;
      float s_dy = 0.f, s_dy_xmu = 0.f;
      for (int64_t t = 0; t < a.tiles; ++t) {
        s_dy += part[t];
        s_dy_xmu += part[plane + t];
      }
      const float inv = a.invstd[ch];
      const float2 pq = dx_coefficients(s_dy, s_dy_xmu, inv, k[j].scale, a.count, a.batch_stats);
      k[j].p = pq.x;
      k[j].q = pq.y;
      if (team.owner()) {
        a.grad_affine[ch] = s_dy_xmu * inv;
        a.grad_affine[C + ch] = s_dy;
      }
    }
    // The held dy goes through the activation's derivative again: cheaper than keeping it in fp32.
    team.template store<true>(static_cast<T*>(a.dx), held_x, held_dy, k, a.activation, a.slope);
  }

  grid_sync();
  // Columns of (I + S)^T, one warp each, over the whole grid.
  for (int64_t j = grid_warp(); j < C; j += grid_warps()) {
    const float2 acc = target_grad_column(a.aux, a.grad_affine, C, j, a.temperature, team.lane);
    if (team.lane == 0) {
      a.grad_target[j] = a.grad_affine[j] + acc.x;
      a.grad_target[C + j] = a.grad_affine[C + j] + acc.y;
    }
  }
}

// A compiled variant of the kernels: element type, layout, packs per lane
// and elements per pack (16 bytes' worth, or 1 for inputs not in whole packs).
template <typename T, bool PLANAR, int PACKS, int W>
struct Variant {
  using type = T;
  static constexpr bool planar = PLANAR;
  static constexpr int packs = PACKS;
  static constexpr int width = W;
};

template <typename T, bool PLANAR, int W, typename F>
cudaError_t dispatch_packs(int packs, F& f) {
  if (packs == kResidentPacks[0]) return f(Variant<T, PLANAR, kResidentPacks[0], W>{});
  if (packs == kResidentPacks[1]) return f(Variant<T, PLANAR, kResidentPacks[1], W>{});
  return cudaErrorInvalidValue;
}

// Calls f with the Variant that (dtype, planar, packs, vector) names.
template <typename F>
cudaError_t dispatch_variant(DType dtype, bool planar, int packs, bool vector, F&& f) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVector = pack_width<T>();
    if (planar)
      return vector ? dispatch_packs<T, true, kVector>(packs, f) : dispatch_packs<T, true, 1>(packs, f);
    return vector ? dispatch_packs<T, false, kVector>(packs, f) : dispatch_packs<T, false, 1>(packs, f);
  });
}

// Whether a plan's Resident geometry covers its input exactly as the kernels
// walk it, `width` elements per pack: whole packs, every pack in one tile,
// every tile in the grid.
bool covers(const Geometry& geo, const Resident& r, int width) {
  if (r.tiles < 1 || r.blocks < 1 || r.blocks * kTeamsPerBlock > 0x7fffffff) return false;
  if (geo.n * geo.c * geo.s > 0x7fffffff) return false;  // the Team's 32-bit indices
  const int64_t per_tile = static_cast<int64_t>(kWarpSize) * r.packs;  // packs (planar) or rows * lanes_c
  int64_t items, groups;
  if (geo.planar) {
    if (r.lanes_c != 1 || geo.s % width != 0) return false;
    items = geo.n * (geo.s / width);
    groups = geo.c;
  } else {
    if (r.lanes_c < 1 || r.lanes_c > kWarpSize || (r.lanes_c & (r.lanes_c - 1)) != 0 || geo.c % width != 0)
      return false;
    items = geo.n * geo.s * r.lanes_c;
    groups = ceil_div(geo.c, static_cast<int64_t>(r.lanes_c) * width);
  }
  return ceil_div(items, per_tile) == r.tiles && groups * r.tiles <= r.blocks * kTeamsPerBlock;
}

}  // namespace

cudaError_t launch_resident_forward(const StepPlan& plan, const void* x, void* out, float* scratch,
                                    const float* gamma_s, const float* beta_s, const float* gamma_t,
                                    const float* beta_t, float* running_mean, float* running_var, int* status,
                                    cudaStream_t stream) {
  const Geometry& geo = plan.geo;
  const Resident& r = plan.fwd_resident;
  return dispatch_variant(plan.dtype, geo.planar, r.packs, r.vector, [&](auto variant) {
    using V = decltype(variant);
    if (!covers(geo, r, V::width)) return cudaErrorInvalidConfiguration;
    ForwardArgs args{x, out, scratch + plan.fwd_partials, scratch + plan.fwd_weight, scratch + plan.fwd_mean,
                     scratch + plan.fwd_invstd, scratch + plan.fwd_aux, Affines{gamma_s, beta_s, gamma_t, beta_t},
                     running_mean, running_var, status, geo.n, geo.c, geo.s, r.tiles, r.lanes_c,
                     plan.activation, plan.slope, plan.count, plan.momentum, plan.eps, plan.temperature,
                     plan.batch_stats, plan.update_running};
    return launch_cooperative(resident_forward_kernel<typename V::type, V::planar, V::packs, V::width>,
                              static_cast<unsigned>(r.blocks), kThreads, stream, args);
  });
}

cudaError_t launch_resident_backward(const StepPlan& plan, const void* x, const void* dy, void* dx,
                                     const float* fwd_scratch, float* bwd_scratch, cudaStream_t stream) {
  const Geometry& geo = plan.geo;
  const Resident& r = plan.bwd_resident;
  return dispatch_variant(plan.dtype, geo.planar, r.packs, r.vector, [&](auto variant) {
    using V = decltype(variant);
    if (!covers(geo, r, V::width)) return cudaErrorInvalidConfiguration;
    BackwardArgs args{x, dy, dx, bwd_scratch + plan.bwd_partials, fwd_scratch + plan.fwd_aux,
                      fwd_scratch + plan.fwd_invstd, bwd_scratch + plan.bwd_grad_affine,
                      bwd_scratch + plan.bwd_grad_target, geo.n, geo.c, geo.s, r.tiles, r.lanes_c,
                      plan.activation, plan.slope, plan.count, plan.temperature, plan.batch_stats};
    return launch_cooperative(resident_backward_kernel<typename V::type, V::planar, V::packs, V::width>,
                              static_cast<unsigned>(r.blocks), kThreads, stream, args);
  });
}

cudaError_t resident_capacity(DType dtype, bool planar, int packs, bool vector, bool backward, int device,
                              int* blocks) {
  return dispatch_variant(dtype, planar, packs, vector, [&](auto variant) {
    using V = decltype(variant);
#ifdef ACNORM_EMULATE
    (void)backward;
    (void)device;
    *blocks = emulator::kResidentBlocks;
    return cudaSuccess;
#else
    int per_multiprocessor = 0, multiprocessors = 0;
    cudaError_t err = backward
        ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(
              &per_multiprocessor, resident_backward_kernel<typename V::type, V::planar, V::packs, V::width>,
              kThreads, 0)
        : cudaOccupancyMaxActiveBlocksPerMultiprocessor(
              &per_multiprocessor, resident_forward_kernel<typename V::type, V::planar, V::packs, V::width>,
              kThreads, 0);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
    *blocks = per_multiprocessor * multiprocessors;
    return err;
#endif
  });
}

}  // namespace acnorm
