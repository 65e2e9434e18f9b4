// Minimal parameter-holding layers for the model ports.
//
// Why not torch::nn::Linear & co.: their constructors random-initialise every weight, which for
// SD v1.5 (~1.07 B parameters) costs seconds and is thrown away by the strict load that follows.
// These allocate with at::empty on the requested device/dtype (the "meta" device builds a model
// for its key/shape manifest without allocating memory). Parameter names are the state-dict
// names: `weight` and `bias`.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <vector>

namespace si {

class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in, int64_t out, bool bias, const at::TensorOptions& opts) : in_features(in), out_features(out) {
    weight = register_parameter("weight", at::empty({out, in}, opts));
    if (bias) this->bias = register_parameter("bias", at::empty({out}, opts));
  }
  // x: [..., in] -> [..., out]
  at::Tensor forward(const at::Tensor& x) { return at::linear(x, weight, bias); }

  int64_t in_features, out_features;
  at::Tensor weight, bias;  // bias undefined when the layer has none
};
TORCH_MODULE(Linear);

class Conv2dImpl : public torch::nn::Module {
 public:
  Conv2dImpl(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t padding, bool bias, const at::TensorOptions& opts)
      : in_channels(in), out_channels(out), stride(stride), padding(padding) {
    weight = register_parameter("weight", at::empty({out, in, kernel, kernel}, opts));
    if (bias) this->bias = register_parameter("bias", at::empty({out}, opts));
  }
  // x: [B, in, H, W] -> [B, out, H', W']
  at::Tensor forward(const at::Tensor& x) { return at::conv2d(x, weight, bias, {stride, stride}, {padding, padding}); }

  int64_t in_channels, out_channels, stride, padding;
  at::Tensor weight, bias;
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
