// CUDA device properties and memory statistics for buildInfo(), training progress and benchmarks.
//
// The CUDA parts need the CUDA headers that come with a CUDA build of libtorch; CMakeLists.txt
// defines SI_WITH_CUDA for such builds (and SI_CUDA_EXTRAS=OFF leaves them out). Without it the
// functions below still work and report no devices and no device memory (-1): the rest of the
// addon runs on CUDA either way, through libtorch.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace si {

struct CudaDeviceInfo {
  int64_t index = 0;
  std::string name;
  int major = 0, minor = 0;       // compute capability
  int64_t total_memory = 0;       // bytes
  int64_t multiprocessors = 0;
};

// Whether this build was compiled with the CUDA extras (SI_WITH_CUDA).
bool cuda_extras_built();
// Every visible CUDA device; empty without CUDA or without the extras.
std::vector<CudaDeviceInfo> cuda_devices();

// -1 = not available (a CPU device, or a build without the CUDA extras).
struct MemoryStats {
  int64_t peak_allocated = -1;  // CUDA caching allocator: peak bytes in tensors since the last reset
  int64_t allocated = -1;       // bytes in tensors now
  int64_t reserved = -1;        // bytes the allocator holds from the driver now
  int64_t peak_rss = -1;        // the process's peak resident set size (getrusage), bytes; never reset
};

MemoryStats memory_stats(const at::Device& device);
// Starts a new peak for `device` (CUDA only; the process's peak RSS cannot be reset).
void reset_peak_memory(const at::Device& device);
int64_t peak_rss_bytes();

}  // namespace si
