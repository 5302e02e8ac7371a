// Host entry points of the AC-Norm kernels. Plain C++ and CUDA runtime types
// only: no torch header, so the module that binds them links no torch library.
// Every buffer is allocated by the caller; nothing here allocates memory.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace acnorm {

// The numbering the Python side shares (the module exports it; acnorm_fused/backends/abi.py
// checks it against its own at import).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum Activation : int { kNone = 0, kRelu = 1, kLeakyRelu = 2 };
// Rows of aux, (kAuxRows, C), written by the forward finalise (see acnorm_fused/backends/multipass.py).
enum AuxRow : int {
  kScale = 0, kShiftB = 1, kCentreHi = 2, kCentreLo = 3, kSourceSig = 4, kTargetSig = 5,
  kRowMax = 6, kRowSum = 7, kAuxRows = 8,
};
// Bits of the finalise status: which affine holds a NaN or an infinity.
enum NonFinite : int { kSourceWeight = 1, kSourceBias = 2, kTargetWeight = 4, kTargetBias = 8 };

// The input's layout and the split grid of the reduction passes (see
// acnorm_fused/backends/geometry.py, which computes it).
struct Geometry {
  bool planar;        // contiguous NC(D)HW; else a row-major (N * S, C) matrix
  int64_t n, c, s;    // samples, channels, spatial positions per sample
  int64_t split_s;    // planar: splits along S, each s_chunk positions
  int64_t split_n;    // planar: splits along N, each n_chunk samples
  int64_t s_chunk;
  int64_t n_chunk;
  int64_t splits;     // interleaved: splits along the rows, each r_chunk rows
  int64_t r_chunk;
  int64_t block_c;    // interleaved: channels per program (a power of two)

  int64_t num_splits() const { return planar ? split_s * split_n : splits; }
};

// Statistics partials (dy == nullptr; partials (3, C, splits): count, mean,
// M2 of x - K, K the channel's first value) or gradient partials (partials
// (2, C, splits): sums of dy and dy * (x - mean), dy through the activation's
// derivative); aux is read by the gradient pass only.
cudaError_t launch_reduce(const Geometry& geo, DType dtype, const void* x, const void* dy,
                          float* partials, const float* aux, int activation, float slope,
                          cudaStream_t stream);

// out = act(((x - hi) - lo) * scale + B) when dy == nullptr, else
// dx = scale * act'(pre) * dy + p * ((x - hi) - lo) + q with coef rows p, q.
cudaError_t launch_elementwise(const Geometry& geo, DType dtype, const void* x, const void* dy,
                               void* out, const float* aux, const float* coef, int activation,
                               float slope, cudaStream_t stream);

struct FinaliseForwardArgs {
  const float* partials;      // (3, C, num_splits), or nullptr for given statistics
  int64_t num_splits;
  const void* x;              // the pilot K of channel c is x[c * pilot_stride]
  int64_t pilot_stride;
  const float* gamma_s;       // the four affines, C values each
  const float* beta_s;
  const float* gamma_t;
  const float* beta_t;
  const float* given_centre;  // given statistics: mean = centre (+ mean_rel), var
  const float* given_mean_rel;  // may be nullptr
  const float* given_var;
  const float* running_mean;  // read when new_mean is not nullptr
  const float* running_var;
  float* mean;
  float* invstd;
  float* new_mean;            // nullptr: the running statistics stay
  float* new_var;
  float* aux;                 // (kAuxRows, C)
  int* status;                // may be nullptr; else gets the NonFinite bits of the affines, and
                              // the running statistics stay when any is set
  int64_t channels;
  float count, momentum, eps, temperature;
};

cudaError_t launch_finalise_forward(const FinaliseForwardArgs& args, DType dtype, cudaStream_t stream);

// dW, dB into grad_affine (2, C) and the dx coefficients p, q into coef (2, C),
// from gradient partials (2, C, num_splits) or, for the coefficients, from
// sums over all processes (global_sums (2, C), may be nullptr).
cudaError_t launch_finalise_backward(const float* partials, int64_t num_splits, const float* global_sums,
                                     const float* invstd, const float* aux, float* grad_affine,
                                     float* coef, int64_t channels, float count, bool batch_stats,
                                     cudaStream_t stream);

// (I + S)^T [dW; dB] into grad_target (2, C), S recomputed from aux.
cudaError_t launch_target_grad(const float* aux, const float* grad_affine, float* grad_target,
                               int64_t channels, float temperature, cudaStream_t stream);

// The single-pass geometry of a step's forward or backward (see
// acnorm_fused/backends/geometry.py, which computes it): warps that each hold
// one tile of x (and dy) in registers across grid barriers, `packs` 16-byte
// packs per lane (or, for inputs not in whole packs, one element per pack),
// so that x is read from memory once. A planar tile is a run
// of one channel's packs (lanes_c = 1); an interleaved tile is `rows` rows of
// lanes_c packs of channels. packs == 0: the multi-pass kernels instead.
struct Resident {
  int packs;       // one of kResidentPacks, or 0
  int lanes_c;     // lanes across channels: 1 (planar), else a power of two up to 32
  int64_t tiles;   // tiles per channel group (a channel, when planar): partial results per channel
  int64_t blocks;  // the grid: every tile's warp, and at least one warp per channel while the GPU holds them
  bool vector;     // 16-byte packs (aligned tensors only), else one element per pack
};

// The packs per lane the single-pass kernels are compiled for, and their warps per block.
inline constexpr int kResidentPacks[] = {2, 8};
inline constexpr int kResidentWarps = 8;

// One layer's eager training or eval step for one input signature: the
// launch geometry, the settings and where each per-channel array lives in
// the step's two scratch buffers (fp32 offsets), all fixed when the plan is
// built (acnorm_fused/backends/plan.py), so that a step is one call per pass.
struct StepPlan {
  Geometry geo;
  DType dtype;
  int activation;
  float slope, count, momentum, eps, temperature;
  bool batch_stats;      // batch statistics, else the running ones
  bool update_running;   // move the running statistics, in place
  int64_t pilot_stride;  // x[c * pilot_stride] is channel c's first value
  // Forward scratch: statistics partials, mean, invstd, aux, the effective weights W.
  int64_t fwd_partials, fwd_mean, fwd_invstd, fwd_aux, fwd_weight;
  // Backward scratch: gradient partials, dW and dB, dx coefficients, target gradients.
  int64_t bwd_partials, bwd_grad_affine, bwd_coef, bwd_grad_target;
  // The single-pass geometry of each pass; a pass whose packs are 0, or whose
  // vector packs meet tensors that are not 16-byte aligned, runs the
  // multi-pass kernels.
  Resident fwd_resident, bwd_resident;
};

// The forward of a plan: statistics (when batch_stats), finalise, apply into out.
cudaError_t launch_step_forward(const StepPlan& plan, const void* x, void* out, float* scratch,
                                const float* gamma_s, const float* beta_s, const float* gamma_t,
                                const float* beta_t, float* running_mean, float* running_var, int* status,
                                cudaStream_t stream);

// The backward of a plan: gradient sums, finalise, (I + S)^T, dx; fwd_scratch is the forward's.
cudaError_t launch_step_backward(const StepPlan& plan, const void* x, const void* dy, void* dx,
                                 const float* fwd_scratch, float* bwd_scratch, cudaStream_t stream);

// The single-pass forward and backward of a plan (one cooperative launch
// each), as launch_step_forward and launch_step_backward call them when the
// plan's Resident geometry has packs.
cudaError_t launch_resident_forward(const StepPlan& plan, const void* x, void* out, float* scratch,
                                    const float* gamma_s, const float* beta_s, const float* gamma_t,
                                    const float* beta_t, float* running_mean, float* running_var, int* status,
                                    cudaStream_t stream);
cudaError_t launch_resident_backward(const StepPlan& plan, const void* x, const void* dy, void* dx,
                                     const float* fwd_scratch, float* bwd_scratch, cudaStream_t stream);

// How many blocks of a single-pass kernel GPU `device` holds at once (the
// occupancy of the compiled variant times the multiprocessors) into *blocks;
// the host emulator holds emulator::kResidentBlocks.
cudaError_t resident_capacity(DType dtype, bool planar, int packs, bool vector, bool backward, int device,
                              int* blocks);

}  // namespace acnorm

namespace acnorm {

// The SASS targets this library was compiled for (e.g. 80, 90), ascending;
// writes up to capacity of them and returns how many there are.
int compiled_archs(int* out, int capacity);

#ifdef ACNORM_EMULATE
// Kernel launches the host emulator has run in this process.
long long emulated_launches();
// Bytes the emulated kernels read in [address, address + size) from the call
// of watch_reads on (what the audit counts of x).
void watch_reads(std::uintptr_t address, std::uintptr_t size);
long long watched_reads();
#endif

}  // namespace acnorm
