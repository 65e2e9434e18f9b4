// Precision helpers shared by inference and training: dtype names, the "fp16 on CPU" error, and
// the dynamic loss scaler of fp16 training.
//
// The mixed-precision scheme (native/generate.cc, native/train.cc):
//   - weights of the loaded models are fp32, bf16 or fp16 (converted on load, models.cc);
//   - latents, scheduler arithmetic, losses and everything trainable (image encoder, LoRA adapters,
//     AdamW moments) stay float32; model inputs are cast to the model's dtype on the way in and the
//     outputs back to float32 on the way out, so gradients flow through the casts;
//   - fp16 training scales the loss (DynamicLossScaler below); bf16 has float32's exponent range and
//     needs no scaling.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

namespace si {

// "fp32" | "bf16" | "fp16" (the names of the JS options), else libtorch's name.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "fp32";
    case at::kBFloat16: return "bf16";
    case at::kHalf: return "fp16";
    default: return c10::toString(t);
  }
}

// libtorch's CPU kernels lack fp16 for several ops SD needs (LayerNorm, GroupNorm, conv on 1.13):
// such a c10::Error becomes this message instead of libtorch's kernel-dispatch error for 'Half' (e.g. from LayerNormKernelImpl).
inline bool half_on_cpu(const at::TensorOptions& opts) { return opts.dtype() == at::kHalf && opts.device().is_cpu(); }

// Runs f(); a c10::Error raised while a model of `opts` is fp16 on the CPU is rethrown with the fix.
template <typename F>
auto with_precision_hint(const at::TensorOptions& opts, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::Error& e) {
    if (!half_on_cpu(opts)) throw;
    throw std::runtime_error(std::string("fp16 needs CUDA; use bf16 on CPU (libtorch's CPU kernels: ") + e.what_without_backtrace() + ")");
  }
}

// Dynamic loss scaling for fp16 training (Micikevicius et al. 2018, "Mixed Precision Training";
// the defaults of torch.cuda.amp.GradScaler): the loss is multiplied by `scale` before backward so
// small gradients survive fp16; the gradients are divided by it before clipping and the update.
// A step whose gradients hold inf/NaN is skipped and the scale halved; after `growth_interval`
// good steps in a row the scale doubles.
struct DynamicLossScaler {
  static constexpr double kInitScale = 65536.0;   // 2^16, GradScaler's init_scale
  static constexpr double kGrowthFactor = 2.0;    // GradScaler's growth_factor
  static constexpr double kBackoffFactor = 0.5;   // GradScaler's backoff_factor
  static constexpr int64_t kGrowthInterval = 2000;  // GradScaler's growth_interval

  double scale = kInitScale;
  int64_t good_steps = 0;     // consecutive finite steps since the last change (GradScaler's growth tracker)
  int64_t skipped_steps = 0;  // steps skipped for non-finite gradients, over the run

  // After the gradients of one step were checked: returns whether the update may be applied.
  bool update(bool finite) {
    if (!finite) {
      scale *= kBackoffFactor;
      good_steps = 0;
      skipped_steps++;
      return false;
    }
    if (++good_steps >= kGrowthInterval) {
      scale *= kGrowthFactor;
      good_steps = 0;
    }
    return true;
  }
};

}  // namespace si
