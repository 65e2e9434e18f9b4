// JS bindings for device information (device_info.h):
//   memoryStats(device) -> { peakAllocatedBytes, allocatedBytes, reservedBytes, peakRssBytes }
//     (the CUDA caching allocator's numbers for a CUDA device, null otherwise; the process's peak RSS)
//   resetPeakMemory(device) -> undefined   (a new CUDA peak starts; no-op on the CPU)
//   mathOptions({ tf32?, cudnnBenchmark? }?) -> { tf32CuDNN, tf32CuBLAS, cudnnBenchmark }   (the values
//     before the call). tf32 sets both of libtorch's TF32 switches (convs and matmuls on Ampere+ GPUs);
//     libtorch's defaults, like PyTorch's: TF32 for cuDNN convs on, for cuBLAS matmuls off, no cuDNN
//     autotuning. Process-wide (at::globalContext()); CUDA only in effect.
// and the CUDA fields of buildInfo() (add_cuda_build_info, called by io_bindings.cc).
#include <ATen/Context.h>
#include <napi.h>

#include <string>

#include "bindings.h"
#include "device_info.h"

namespace si {

namespace {

at::Device device_arg(const Napi::CallbackInfo& info, const char* what) {
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(info.Env(), std::string("Expected ") + what + "(device: string)");
  const std::string name = info[0].As<Napi::String>().Utf8Value();
  try {
    return at::Device(name);
  } catch (const c10::Error&) {
    throw Napi::TypeError::New(info.Env(), "Expected a device such as \"cpu\" or \"cuda:0\" but received " + name);
  }
}

Napi::Value bytes_or_null(Napi::Env env, int64_t v) { return v < 0 ? env.Null() : Napi::Number::New(env, static_cast<double>(v)); }

Napi::Value MemoryStatsJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const MemoryStats s = memory_stats(device_arg(info, "memoryStats"));
  Napi::Object o = Napi::Object::New(env);
  o.Set("peakAllocatedBytes", bytes_or_null(env, s.peak_allocated));
  o.Set("allocatedBytes", bytes_or_null(env, s.allocated));
  o.Set("reservedBytes", bytes_or_null(env, s.reserved));
  o.Set("peakRssBytes", bytes_or_null(env, s.peak_rss));
  return o;
}

Napi::Value ResetPeakMemory(const Napi::CallbackInfo& info) {
  reset_peak_memory(device_arg(info, "resetPeakMemory"));
  return info.Env().Undefined();
}

Napi::Value MathOptions(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Context& ctx = at::globalContext();
  Napi::Object before = Napi::Object::New(env);
  before.Set("tf32CuDNN", ctx.allowTF32CuDNN());
  before.Set("tf32CuBLAS", ctx.allowTF32CuBLAS());
  before.Set("cudnnBenchmark", ctx.benchmarkCuDNN());
  if (info.Length() > 0 && !info[0].IsUndefined()) {
    if (!info[0].IsObject()) throw Napi::TypeError::New(env, "Expected mathOptions({ tf32?, cudnnBenchmark? })");
    Napi::Object o = info[0].As<Napi::Object>();
    auto flag = [&](const char* key, auto set) {
      Napi::Value v = o.Get(key);
      if (v.IsUndefined()) return;
      if (!v.IsBoolean()) throw Napi::TypeError::New(env, std::string("Expected a boolean for ") + key);
      set(v.As<Napi::Boolean>().Value());
    };
    flag("tf32", [&](bool b) {
      ctx.setAllowTF32CuDNN(b);
      ctx.setAllowTF32CuBLAS(b);
    });
    flag("cudnnBenchmark", [&](bool b) { ctx.setBenchmarkCuDNN(b); });
  }
  return before;
}

}  // namespace

void add_cuda_build_info(Napi::Env env, Napi::Object info) {
  info.Set("cudaExtras", cuda_extras_built());
  Napi::Array devices = Napi::Array::New(env);
  uint32_t i = 0;
  for (const auto& d : cuda_devices()) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("index", static_cast<double>(d.index));
    o.Set("name", d.name);
    o.Set("computeCapability", std::to_string(d.major) + "." + std::to_string(d.minor));
    o.Set("totalMemoryBytes", static_cast<double>(d.total_memory));
    o.Set("multiProcessors", static_cast<double>(d.multiprocessors));
    devices.Set(i++, o);
  }
  info.Set("cudaDevices", devices);
}

void register_device(Napi::Env env, Napi::Object exports) {
  exports.Set("memoryStats", Napi::Function::New(env, MemoryStatsJs, "memoryStats"));
  exports.Set("resetPeakMemory", Napi::Function::New(env, ResetPeakMemory, "resetPeakMemory"));
  exports.Set("mathOptions", Napi::Function::New(env, MathOptions, "mathOptions"));
}

}  // namespace si
