// CUDA device properties and memory statistics (see device_info.h).
#include "device_info.h"

#include <sys/resource.h>
#include <torch/cuda.h>

#ifdef SI_WITH_CUDA
// Only c10's CUDA headers and the CUDA runtime's: ATen/cuda/CUDAContext.h would also need the cuBLAS and
// cuSPARSE headers, which a minimal CUDA toolkit (nvcc + cudart, as pip-installed PyTorch needs) lacks.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#endif

namespace si {

bool cuda_extras_built() {
#ifdef SI_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::vector<CudaDeviceInfo> cuda_devices() {
  std::vector<CudaDeviceInfo> out;
#ifdef SI_WITH_CUDA
  if (!torch::cuda::is_available()) return out;
  const int64_t n = static_cast<int64_t>(torch::cuda::device_count());
  for (int64_t i = 0; i < n; ++i) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, static_cast<int>(i)) != cudaSuccess) {
      cudaGetLastError();  // clear the error state for libtorch's next call
      continue;
    }
    CudaDeviceInfo d;
    d.index = i;
    d.name = p.name;
    d.major = p.major;
    d.minor = p.minor;
    d.total_memory = static_cast<int64_t>(p.totalGlobalMem);
    d.multiprocessors = p.multiProcessorCount;
    out.push_back(d);
  }
#endif
  return out;
}

int64_t peak_rss_bytes() {
  struct rusage ru {};
  if (getrusage(RUSAGE_SELF, &ru) != 0) return -1;
#ifdef __APPLE__
  return static_cast<int64_t>(ru.ru_maxrss);  // bytes on macOS
#else
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;  // kilobytes on Linux
#endif
}

MemoryStats memory_stats(const at::Device& device) {
  MemoryStats s;
  s.peak_rss = peak_rss_bytes();
#ifdef SI_WITH_CUDA
  if (device.is_cuda() && torch::cuda::is_available()) {
    try {
      const c10::DeviceIndex index = device.has_index() ? device.index() : c10::cuda::current_device();
      const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index);
      // [0] is StatType::AGGREGATE (all pools) in every libtorch version
      s.peak_allocated = stats.allocated_bytes[0].peak;
      s.allocated = stats.allocated_bytes[0].current;
      s.reserved = stats.reserved_bytes[0].current;
    } catch (const c10::Error&) {
      // the allocator is not initialised before the first CUDA allocation: nothing to report yet
    }
  }
#endif
  return s;
}

void reset_peak_memory(const at::Device& device) {
#ifdef SI_WITH_CUDA
  if (device.is_cuda() && torch::cuda::is_available()) {
    try {
      const c10::DeviceIndex index = device.has_index() ? device.index() : c10::cuda::current_device();
      c10::cuda::CUDACachingAllocator::resetPeakStats(index);
    } catch (const c10::Error&) {
      // not initialised yet: there is no peak to reset
    }
  }
#endif
}

}  // namespace si
