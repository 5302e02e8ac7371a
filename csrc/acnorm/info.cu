// What the library was compiled for, asked from the host.

#include "common.cuh"

namespace acnorm {

int compiled_archs(int* out, int capacity) {
#ifdef __CUDA_ARCH_LIST__
  // nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) for the host pass too.
  static constexpr int archs[] = {__CUDA_ARCH_LIST__};
  const int count = static_cast<int>(sizeof(archs) / sizeof(archs[0]));
  for (int i = 0; i < count && i < capacity; ++i) out[i] = archs[i] / 10;
  return count;
#else
  (void)out;
  (void)capacity;
  return 0;  // the host emulator: no GPU code at all
#endif
}

#ifdef ACNORM_EMULATE
long long emulated_launches() { return emulator::launches.load(); }

void watch_reads(std::uintptr_t address, std::uintptr_t size) {
  emulator::watched_begin = reinterpret_cast<const char*>(address);
  emulator::watched_end = emulator::watched_begin + size;
  emulator::watched_bytes = 0;
}

long long watched_reads() { return emulator::watched_bytes; }
#endif

}  // namespace acnorm
