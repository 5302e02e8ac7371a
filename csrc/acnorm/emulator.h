// A host emulator of the CUDA features the kernels use, so that the same
// sources compile with a C++ compiler (-DACNORM_EMULATE) and run on CPU
// memory: how the kernels are tested on machines without a GPU.
//
// Every thread is a fiber with its own stack; __syncthreads() and each half
// of a warp shuffle yield to a scheduler that resumes every live fiber once
// per round, so all threads pass each barrier together. A launch runs its
// blocks one after another; a cooperative launch runs every block of its grid
// at once in one scheduler, and its grid barrier holds each fiber until all
// have arrived, so the kernels' one-pass algorithms run here as on a GPU whose
// blocks are all resident. Warps are not independent here as on a GPU, which
// the kernels never rely on: every lane of a warp meets the same barriers,
// and warps that finish early simply leave the rounds. A cooperative kernel
// keeps no __shared__ memory: with every block live at once, a static would
// be one block's memory for all. Fast enough for the small shapes of the
// tests, and nothing more.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include <cuda_runtime_api.h>  // dim3, uint3, float2, error codes; host declarations only
#include <vector_functions.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#undef __shared__
#define __shared__ static  // one block runs at a time (but see cooperative launches above)
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace acnorm {
namespace emulator {

struct Fiber {
  ucontext_t context;
  uint3 index;
  uint3 block;
  bool done;
};

// The fibers that run together: one block, or every block of a cooperative launch.
struct Fibers {
  std::vector<Fiber> fibers;  // block after block, so a warp is 32 consecutive fibers
  std::vector<std::uint32_t> exchange;  // one 32-bit word per thread, for shuffles
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  int current = 0;
  bool cooperative = false;
  size_t live = 0;     // fibers not yet returned
  size_t arrived = 0;  // at the grid barrier
  unsigned generation = 0;
};

constexpr size_t kStackBytes = 64 * 1024;

// Blocks a cooperative launch may have: an emulated GPU of 8 multiprocessors
// that each hold 8 blocks of the resident kernels.
constexpr int kResidentBlocks = 64;

inline thread_local Fibers* active = nullptr;
inline thread_local dim3 grid_dim, block_dim;
// Fiber stacks, kept for the next launch: allocating them costs more than a small launch.
inline thread_local std::vector<std::unique_ptr<char[]>> stacks;

// The first error a launch ran into, as a GPU would report it.
inline thread_local cudaError_t pending_error = cudaSuccess;

// Kernel launches run in this process: what the audit counts per training step.
inline std::atomic<long long> launches{0};

// Bytes the kernels have read inside one watched range of memory: what the
// audit counts of x per pass.
inline thread_local const char* watched_begin = nullptr;
inline thread_local const char* watched_end = nullptr;
inline thread_local long long watched_bytes = 0;

inline void count_read(const void* ptr, size_t bytes) {
  const char* p = static_cast<const char*>(ptr);
  if (p >= watched_begin && p < watched_end) watched_bytes += static_cast<long long>(bytes);
}

// Whether an access of this alignment may go to ptr. A GPU faults on a
// misaligned vector access; here the access is skipped instead and the launch
// reports the GPU's error.
inline bool aligned_access(const void* ptr, size_t alignment) {
  if (reinterpret_cast<std::uintptr_t>(ptr) % alignment == 0) return true;
  if (pending_error == cudaSuccess) pending_error = cudaErrorMisalignedAddress;
  return false;
}

inline cudaError_t take_error() {
  const cudaError_t error = pending_error;
  pending_error = cudaSuccess;
  return error;
}

inline uint3 thread_index() { return active->fibers[active->current].index; }
inline uint3 block_index() { return active->fibers[active->current].block; }

inline void yield() { swapcontext(&active->fibers[active->current].context, &active->scheduler); }

inline void fiber_entry() {
  (*active->body)();
  active->fibers[active->current].done = true;  // returns to the scheduler through uc_link
  --active->live;
}

// The value of the lane that source(me) names, for every lane of a warp.
template <typename T, typename Source>
T exchange(T value, Source source) {
  static_assert(sizeof(T) == 4, "the kernels shuffle 32-bit values");
  const int me = active->current;
  std::memcpy(&active->exchange[me], &value, 4);
  yield();  // every lane has written
  T result;
  std::memcpy(&result, &active->exchange[source(me)], 4);
  yield();  // every lane has read
  return result;
}

template <typename T>
T shuffle_xor(T value, int lane_mask) {
  return exchange(value, [&](int me) { return me ^ lane_mask; });
}

template <typename T>
T shuffle(T value, int lane) {
  return exchange(value, [&](int me) { return (me & ~31) | (lane & 31); });
}

// The grid barrier of a cooperative launch. The last fiber to arrive opens
// it and yields once more, so that every fiber leaves in the same round and
// the warps stay in step.
inline void grid_sync() {
  Fibers& g = *active;
  if (!g.cooperative) {  // a GPU would hang or fault: a grid barrier needs a cooperative launch
    if (pending_error == cudaSuccess) pending_error = cudaErrorLaunchFailure;
    return;
  }
  const unsigned generation = g.generation;
  ++g.arrived;
  do {
    if (g.generation == generation && g.arrived == g.live) {
      g.arrived = 0;
      ++g.generation;
    }
    yield();
  } while (g.generation == generation);
}

// Runs the fibers of `blocks` (block indices) to completion.
inline void run_fibers(Fibers& state, const std::vector<uint3>& blocks, dim3 block) {
  const unsigned threads = block.x * block.y * block.z;
  const size_t count = blocks.size() * threads;
  state.fibers.resize(count);
  state.exchange.resize(count);
  while (stacks.size() < count) stacks.emplace_back(new char[kStackBytes]);
  for (size_t b = 0; b < blocks.size(); ++b)
    for (unsigned i = 0; i < threads; ++i) {
      Fiber& f = state.fibers[b * threads + i];
      f.index = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
      f.block = blocks[b];
      f.done = false;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = stacks[b * threads + i].get();
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &state.scheduler;
      makecontext(&f.context, fiber_entry, 0);
    }
  state.live = count;
  state.arrived = 0;
  for (bool live = true; live;) {
    live = false;
    for (size_t i = 0; i < count; ++i) {
      if (state.fibers[i].done) continue;
      state.current = static_cast<int>(i);
      swapcontext(&state.scheduler, &state.fibers[i].context);
      live = live || !state.fibers[i].done;
    }
  }
}

// A launch: block after block, or (cooperative) every block at once, which
// fails as a GPU's launch does when the grid exceeds kResidentBlocks.
inline void run(dim3 grid, dim3 block, const std::function<void()>& body, bool cooperative = false) {
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(make_uint3(x, y, z));
  if (cooperative && blocks.size() > static_cast<size_t>(kResidentBlocks)) {
    if (pending_error == cudaSuccess) pending_error = cudaErrorCooperativeLaunchTooLarge;
    return;  // refused: nothing ran
  }
  ++launches;
  Fibers state;
  state.body = &body;
  state.cooperative = cooperative;
  Fibers* outer = active;
  active = &state;
  grid_dim = grid;
  block_dim = block;
  if (cooperative) {
    run_fibers(state, blocks, block);
  } else {
    for (const uint3& b : blocks) run_fibers(state, {b}, block);
  }
  active = outer;
}

}  // namespace emulator
}  // namespace acnorm

#define threadIdx (::acnorm::emulator::thread_index())
#define blockIdx (::acnorm::emulator::block_index())
#define gridDim (::acnorm::emulator::grid_dim)
#define blockDim (::acnorm::emulator::block_dim)
#define __syncthreads() ::acnorm::emulator::yield()
#define __shfl_xor_sync(mask, value, lane_mask) ::acnorm::emulator::shuffle_xor((value), (lane_mask))
#define __shfl_sync(mask, value, lane) ::acnorm::emulator::shuffle((value), (lane))

// The runtime's own function would look for a driver.
#define cudaGetLastError() ::acnorm::emulator::take_error()

inline float __frcp_rn(float x) { return 1.f / x; }
using std::min;
