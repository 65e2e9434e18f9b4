// Random weights (see random_init.h).
#include "random_init.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>
#include <map>

#include "layers.h"

namespace si {

namespace {

// The recipe's spreads (lib/tiny-model.ts initTensor).
constexpr double kBiasStd = 0.05;
constexpr double kNormStd = 0.1;
constexpr double kFreeStd = 0.3;

// A generator of the device's kind, seeded: a CPU generator, or a clone of the device's default
// generator (so the process's default stream is left alone, and no CUDA header is needed).
at::Generator seeded_generator(const at::Device& device, uint64_t seed) {
  if (device.is_cpu()) return at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Generator gen = at::globalContext().defaultGenerator(device).clone();
  gen.set_current_seed(seed);
  return gen;
}

}  // namespace

size_t random_init(torch::nn::Module& module, uint64_t seed) {
  torch::NoGradGuard no_grad;
  // which module owns each parameter decides its distribution
  std::map<const at::TensorImpl*, const torch::nn::Module*> owner;
  auto note = [&](const torch::nn::Module& m) {
    for (const auto& p : m.named_parameters(/*recurse=*/false)) owner[p.value().unsafeGetTensorImpl()] = &m;
  };
  note(module);
  for (const auto& m : module.modules(/*include_self=*/false)) note(*m);

  std::map<std::string, at::Generator> generators;  // one per device
  size_t n = 0;
  for (auto& item : module.named_parameters(/*recurse=*/true)) {
    at::Tensor& p = item.value();
    const std::string& key = item.key();
    const torch::nn::Module* m = owner[p.unsafeGetTensorImpl()];
    const bool norm = dynamic_cast<const GroupNormImpl*>(m) || dynamic_cast<const LayerNormImpl*>(m);
    const bool embedding = dynamic_cast<const EmbeddingImpl*>(m) != nullptr;
    const bool bias = key.size() >= 5 && key.compare(key.size() - 5, 5, ".bias") == 0;
    double mean = 0, std = kFreeStd;
    if (norm) {
      mean = bias ? 0.0 : 1.0;
      std = kNormStd;
    } else if (bias) {
      std = kBiasStd;
    } else if (p.dim() >= 2 && !embedding) {
      const double fan_in = static_cast<double>(p.numel() / p.size(0));
      std = std::sqrt(1.0 / fan_in);
    }
    const std::string dev = p.device().str();
    auto it = generators.find(dev);
    if (it == generators.end()) it = generators.emplace(dev, seeded_generator(p.device(), seed)).first;
    at::Tensor value = at::empty(p.sizes(), p.options().dtype(at::kFloat)).normal_(mean, std, it->second);
    p.copy_(value);
    n++;
  }
  return n;
}

}  // namespace si
