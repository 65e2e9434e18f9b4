// LPIPS v0.1 with the AlexNet trunk (Zhang et al., "The Unreasonable Effectiveness of Deep Features
// as a Perceptual Metric", CVPR 2018), ported from lpips 0.1.4 (richzhang/PerceptualSimilarity
// tag v0.1.4): lpips/lpips.py `LPIPS` (net='alex', version='0.1', lpips=True, spatial=False),
// `ScalingLayer`, `NetLinLayer`, `normalize_tensor`, `spatial_average`, and
// lpips/pretrained_networks.py `alexnet` (torchvision 0.14 `AlexNet().features`, sliced after each ReLU).
//
// Module names are the keys of the usual weight files: `features.{0,3,6,8,10}.{weight,bias}`
// (torchvision's alexnet checkpoint) and `lin{0..4}.model.1.weight` (lpips' weights/v0.1/alex.pth).
// The channel widths come from the config, which lib/ reads off the weight file's shapes, so a
// width-reduced trunk (the tiny fixture: 16/48/96/64/64) loads the same way as the real one.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include <array>
#include <vector>

#include "json.h"
#include "layers.h"

namespace si {

// The five conv widths of the AlexNet trunk (real AlexNet: 64, 192, 384, 256, 256).
struct LpipsConfig {
  std::array<int64_t, 5> channels{};
  static LpipsConfig from_json(const JsonValue& cfg);
};

struct LpipsOutput {
  at::Tensor distance;                  // [N]
  at::Tensor per_layer;                 // [N, 5]: column k is relu{k+1}'s term
  std::vector<at::Tensor> features0;    // relu1..relu5 of in0 (raw trunk outputs)
  std::vector<at::Tensor> features1;    // relu1..relu5 of in1
  std::vector<at::Tensor> lin_out;      // [N, 1, h_k, w_k]: lin_k((n0 - n1)^2) before the spatial mean
};

class LpipsImpl : public torch::nn::Module {
 public:
  LpipsImpl(const LpipsConfig& cfg, const at::TensorOptions& opts);
  // in0, in1: [N, 3, H, W] in [-1, 1] (lpips' normalize=False convention)
  LpipsOutput forward(const at::Tensor& in0, const at::Tensor& in1);
  // x: [N, 3, H, W] after the ScalingLayer -> relu1..relu5
  std::vector<at::Tensor> trunk(const at::Tensor& x);

  // torchvision AlexNet().features: 0 conv, 1 relu, 2 maxpool, 3 conv, 4 relu, 5 maxpool, 6 conv,
  // 7 relu, 8 conv, 9 relu, 10 conv, 11 relu, 12 maxpool (unused by LPIPS). Weightless slots keep
  // the indices.
  torch::nn::ModuleList features;
  Conv2d conv0{nullptr}, conv3{nullptr}, conv6{nullptr}, conv8{nullptr}, conv10{nullptr};
  // lin{k}.model = [Dropout (identity in eval), 1x1 conv C_k -> 1 without bias]
  std::array<Conv2d, 5> lin{Conv2d{nullptr}, Conv2d{nullptr}, Conv2d{nullptr}, Conv2d{nullptr}, Conv2d{nullptr}};
};
TORCH_MODULE(Lpips);

}  // namespace si
