// A host emulator of the CUDA features the kernels use, so that the same
// sources compile with a C++ compiler (-DACNORM_EMULATE) and run on CPU
// memory: how the kernels are tested on machines without a GPU.
//
// A launch runs its blocks one after another. Every thread of a block is a
// fiber with its own stack; __syncthreads() and each half of a warp shuffle
// yield to a scheduler that resumes every live fiber once per round, so all
// threads of a block pass each barrier together. Warps are not independent
// here as on a GPU, which the kernels never rely on: every lane of a warp
// meets the same barriers, and warps that finish early simply leave the
// rounds. Fast enough for the small shapes of the tests, and nothing more.
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
#define __shared__ static  // one block runs at a time: a static is the block's shared memory
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace acnorm {
namespace emulator {

struct Fiber {
  ucontext_t context;
  uint3 index;
  bool done;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<std::uint32_t> exchange;  // one 32-bit word per thread, for shuffles
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  int current = 0;
};

constexpr size_t kStackBytes = 64 * 1024;

inline thread_local Block* active = nullptr;
inline thread_local dim3 grid_dim, block_dim;
inline thread_local uint3 block_idx;

// The first error a launch ran into, as a GPU would report it.
inline thread_local cudaError_t pending_error = cudaSuccess;

// Kernel launches run in this process: what the audit counts per training step.
inline std::atomic<long long> launches{0};

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

inline int linear_thread() {
  const uint3 t = thread_index();
  return static_cast<int>(t.x + block_dim.x * (t.y + block_dim.y * t.z));
}

inline void yield() { swapcontext(&active->fibers[active->current].context, &active->scheduler); }

inline void fiber_entry() {
  (*active->body)();
  active->fibers[active->current].done = true;  // returns to the scheduler through uc_link
}

template <typename T>
T shuffle_xor(T value, int lane_mask) {
  static_assert(sizeof(T) == 4, "the kernels shuffle 32-bit values");
  const int me = linear_thread();
  std::memcpy(&active->exchange[me], &value, 4);
  yield();  // every lane has written
  T result;
  std::memcpy(&result, &active->exchange[me ^ lane_mask], 4);
  yield();  // every lane has read
  return result;
}

inline void run(dim3 grid, dim3 block, const std::function<void()>& body) {
  ++launches;
  Block state;
  const unsigned threads = block.x * block.y * block.z;
  state.fibers.resize(threads);
  state.exchange.resize(threads);
  for (unsigned i = 0; i < threads; ++i) state.stacks.emplace_back(new char[kStackBytes]);
  state.body = &body;
  Block* outer = active;
  active = &state;
  grid_dim = grid;
  block_dim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = make_uint3(x, y, z);
        for (unsigned i = 0; i < threads; ++i) {
          Fiber& f = state.fibers[i];
          f.index = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          f.done = false;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = state.stacks[i].get();
          f.context.uc_stack.ss_size = kStackBytes;
          f.context.uc_link = &state.scheduler;
          makecontext(&f.context, fiber_entry, 0);
        }
        for (bool live = true; live;) {
          live = false;
          for (unsigned i = 0; i < threads; ++i) {
            if (state.fibers[i].done) continue;
            state.current = static_cast<int>(i);
            swapcontext(&state.scheduler, &state.fibers[i].context);
            live = live || !state.fibers[i].done;
          }
        }
      }
  active = outer;
}

}  // namespace emulator
}  // namespace acnorm

#define threadIdx (::acnorm::emulator::thread_index())
#define blockIdx (::acnorm::emulator::block_idx)
#define gridDim (::acnorm::emulator::grid_dim)
#define blockDim (::acnorm::emulator::block_dim)
#define __syncthreads() ::acnorm::emulator::yield()
#define __shfl_xor_sync(mask, value, lane_mask) ::acnorm::emulator::shuffle_xor((value), (lane_mask))

// The runtime's own function would look for a driver.
#define cudaGetLastError() ::acnorm::emulator::take_error()

inline float __frcp_rn(float x) { return 1.f / x; }
using std::min;
