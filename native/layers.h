// Minimal parameter-holding layers for the model ports.
//
// Why not torch::nn::Linear & co.: their constructors random-initialise every weight, which for
// SD v1.5 (~1.07 B parameters) costs seconds and is thrown away by the strict load that follows.
// These allocate with at::empty on the requested device/dtype (the "meta" device builds a model
// for its key/shape manifest without allocating memory). Parameter names are the state-dict
// names: `weight` and `bias`.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <string>
#include <vector>

namespace si {

// One low-rank adapter (LoRA, Hu et al. 2021, in the kohya sd-scripts `networks.lora` form) on a
// Linear or Conv2d: forward adds scale * (alpha / rank) * up(down(x)). The adapters are plain
// members, NOT registered parameters, so named_parameters() and the strict loader see only the base
// weights. native/lora.h creates, loads, scales, merges, collects and removes them.
struct LoraAdapter {
  std::string name;     // the LoRA it belongs to: several LoRAs can stack on one layer
  at::Tensor down, up;  // Linear: [r, in], [out, r]. Conv2d: [r, in, kh, kw], [out, r, 1, 1]
  double alpha = 1;     // kohya's alpha: the update is scaled by alpha / rank
  int64_t rank = 1;
  double scale = 1;     // the user's strength (diffusers: cross_attention_kwargs["scale"])
  bool enabled = true;
  bool merged = false;  // folded into the layer's weight by merge_lora(): forward skips it
  double multiplier() const { return scale * alpha / static_cast<double>(rank); }
  // Whether forward adds this adapter's branch; a zero scale adds nothing, so it costs nothing.
  bool active() const { return enabled && !merged && scale != 0; }
};
using LoraAdapters = std::vector<std::shared_ptr<LoraAdapter>>;

// Per-thread "run without LoRA" switch, set by si::LoraBypass (lora.h). Training needs the same
// model without its adapters in a no-grad pass (SingleInsert's L_sm target); a thread-local flag
// does that without touching adapter state that other code may be reading.
inline bool& lora_bypassed() {
  static thread_local bool bypassed = false;
  return bypassed;
}

// Adds the active adapters' branches to the base output y; `branch(a, x_a)` computes up(down(x_a)).
// Adapters may be in another dtype than the layer: training keeps them float32 on bf16/fp16 layers
// (native/precision.h). Then the branch runs in the adapter's dtype on x cast to it, and its result
// is cast back to y's dtype; gradients flow through both casts. When the dtypes agree nothing is
// cast, so float32 layers compute exactly what they did before mixed precision existed.
template <typename Branch>
at::Tensor add_lora(at::Tensor y, const at::Tensor& x, const LoraAdapters& lora, Branch branch) {
  const bool bypass = lora_bypassed();
  for (const auto& a : lora) {
    // a merged adapter lives inside the weight: it cannot be left out by a bypass
    TORCH_CHECK(!(bypass && a->merged && a->enabled), "LoRA \"", a->name, "\" is merged into the weights and cannot be bypassed; unmerge it first");
    if (bypass || !a->active()) continue;
    const at::ScalarType t = a->down.scalar_type();
    if (t == x.scalar_type()) {
      y = y + branch(*a, x) * a->multiplier();
    } else {
      y = y + (branch(*a, x.to(t)) * a->multiplier()).to(y.scalar_type());
    }
  }
  return y;
}

class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in, int64_t out, bool bias, const at::TensorOptions& opts) : in_features(in), out_features(out) {
    weight = register_parameter("weight", at::empty({out, in}, opts));
    if (bias) this->bias = register_parameter("bias", at::empty({out}, opts));
  }
  // x: [..., in] -> [..., out]; with adapters: + s * (alpha / r) * (x @ down^T) @ up^T
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor y = at::linear(x, weight, bias);
    if (lora.empty()) return y;
    return add_lora(y, x, lora, [&](const LoraAdapter& a, const at::Tensor& xa) { return at::linear(at::linear(xa, a.down), a.up); });
  }

  int64_t in_features, out_features;
  at::Tensor weight, bias;  // bias undefined when the layer has none
  LoraAdapters lora;        // not parameters: see LoraAdapter
};
TORCH_MODULE(Linear);

class Conv2dImpl : public torch::nn::Module {
 public:
  Conv2dImpl(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t padding, bool bias, const at::TensorOptions& opts)
      : in_channels(in), out_channels(out), stride(stride), padding(padding) {
    weight = register_parameter("weight", at::empty({out, in, kernel, kernel}, opts));
    if (bias) this->bias = register_parameter("bias", at::empty({out}, opts));
  }
  // x: [B, in, H, W] -> [B, out, H', W']; with adapters: + s * (alpha / r) * up(down(x)), where down
  // has this layer's kernel, stride and padding and up is a 1x1 conv (kohya's LoRA for Conv2d)
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor y = at::conv2d(x, weight, bias, {stride, stride}, {padding, padding});
    if (lora.empty()) return y;
    return add_lora(y, x, lora, [&](const LoraAdapter& a, const at::Tensor& xa) {
      return at::conv2d(at::conv2d(xa, a.down, {}, {stride, stride}, {padding, padding}), a.up);
    });
  }

  int64_t in_channels, out_channels, stride, padding;
  at::Tensor weight, bias;
  LoraAdapters lora;  // not parameters: see LoraAdapter
};
TORCH_MODULE(Conv2d);

class GroupNormImpl : public torch::nn::Module {
 public:
  GroupNormImpl(int64_t groups, int64_t channels, double eps, const at::TensorOptions& opts) : groups(groups), eps(eps) {
    weight = register_parameter("weight", at::empty({channels}, opts));
    bias = register_parameter("bias", at::empty({channels}, opts));
  }
  // x: [B, C, ...] -> same shape
  at::Tensor forward(const at::Tensor& x) { return at::group_norm(x, groups, weight, bias, eps); }

  int64_t groups;
  double eps;
  at::Tensor weight, bias;
};
TORCH_MODULE(GroupNorm);

class LayerNormImpl : public torch::nn::Module {
 public:
  LayerNormImpl(int64_t dim, double eps, const at::TensorOptions& opts) : dim(dim), eps(eps) {
    weight = register_parameter("weight", at::empty({dim}, opts));
    bias = register_parameter("bias", at::empty({dim}, opts));
  }
  // x: [..., dim] -> same shape
  at::Tensor forward(const at::Tensor& x) { return at::layer_norm(x, {dim}, weight, bias, eps); }

  int64_t dim;
  double eps;
  at::Tensor weight, bias;
};
TORCH_MODULE(LayerNorm);

class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t num, int64_t dim, const at::TensorOptions& opts) {
    weight = register_parameter("weight", at::empty({num, dim}, opts));
  }
  // ids: [...] int64 -> [..., dim]
  at::Tensor forward(const at::Tensor& ids) { return at::embedding(weight, ids); }

  at::Tensor weight;
};
TORCH_MODULE(Embedding);

// Fills a slot without weights (Dropout in eval, activation) so that Sequential indices line up
// with the checkpoint keys: diffusers' `to_out.1` and `ff.net.1` are Dropouts, so the weights sit
// at `to_out.0`, `ff.net.0.proj` and `ff.net.2`.
class WeightlessImpl : public torch::nn::Module {};
TORCH_MODULE(Weightless);

}  // namespace si
