// LPIPS v0.1 / AlexNet: see lpips.h for the reference files.
#include "lpips.h"

#include <stdexcept>
#include <string>

#include "model.h"

namespace si {

namespace {

// lpips.py ScalingLayer (version 0.1): x' = (x - shift) / scale per RGB channel. lpips registers
// them as float32 buffers (torch.Tensor), so they stay float32 constants even in a float64 run.
constexpr float kShift[3] = {-.030f, -.088f, -.188f};
constexpr float kScale[3] = {.458f, .448f, .450f};
// lpips.py normalize_tensor: eps is added to the norm, outside the square root
constexpr double kNormalizeEps = 1e-10;

// normalize_tensor: f / (sqrt(sum_c f^2) + eps), per pixel over channels. f: [N, C, H, W]
at::Tensor normalize_tensor(const at::Tensor& f) {
  at::Tensor norm = at::sqrt(at::sum(f * f, {1}, /*keepdim=*/true));  // [N, 1, H, W]
  return f / (norm + kNormalizeEps);
}

}  // namespace

LpipsConfig LpipsConfig::from_json(const JsonValue& cfg) {
  std::vector<int64_t> ch = cfg_int_list(cfg, "channels");
  if (ch.size() != 5)
    throw std::invalid_argument("LPIPS config key \"channels\" has " + std::to_string(ch.size()) +
                                " entries, expected the 5 conv widths of the AlexNet trunk (64, 192, 384, 256, 256 for the real model)");
  LpipsConfig c;
  for (size_t i = 0; i < 5; ++i) {
    if (ch[i] <= 0) throw std::invalid_argument("LPIPS config key \"channels\" must hold positive integers");
    c.channels[i] = ch[i];
  }
  return c;
}

LpipsImpl::LpipsImpl(const LpipsConfig& cfg, const at::TensorOptions& opts) {
  const auto& c = cfg.channels;
  // torchvision 0.14 models/alexnet.py AlexNet.features
  conv0 = Conv2d(3, c[0], /*kernel=*/11, /*stride=*/4, /*padding=*/2, /*bias=*/true, opts);
  conv3 = Conv2d(c[0], c[1], 5, 1, 2, true, opts);
  conv6 = Conv2d(c[1], c[2], 3, 1, 1, true, opts);
  conv8 = Conv2d(c[2], c[3], 3, 1, 1, true, opts);
  conv10 = Conv2d(c[3], c[4], 3, 1, 1, true, opts);
  features->push_back(conv0);
  features->push_back(Weightless());  // 1: ReLU
  features->push_back(Weightless());  // 2: MaxPool2d(3, 2)
  features->push_back(conv3);
  features->push_back(Weightless());  // 4: ReLU
  features->push_back(Weightless());  // 5: MaxPool2d(3, 2)
  features->push_back(conv6);
  features->push_back(Weightless());  // 7: ReLU
  features->push_back(conv8);
  features->push_back(Weightless());  // 9: ReLU
  features->push_back(conv10);
  features->push_back(Weightless());  // 11: ReLU
  features->push_back(Weightless());  // 12: MaxPool2d(3, 2), not used by LPIPS
  register_module("features", features);
  // lpips.py NetLinLayer(chn_in, use_dropout=True): model = Sequential(Dropout(), Conv2d(chn_in, 1, 1, bias=False))
  for (size_t k = 0; k < 5; ++k) {
    auto net_lin = std::make_shared<torch::nn::Module>();
    torch::nn::ModuleList model;
    lin[k] = Conv2d(c[k], 1, 1, 1, 0, /*bias=*/false, opts);
    model->push_back(Weightless());  // model.0: Dropout, identity in eval
    model->push_back(lin[k]);
    net_lin->register_module("model", model);
    register_module("lin" + std::to_string(k), net_lin);
  }
}

std::vector<at::Tensor> LpipsImpl::trunk(const at::Tensor& x) {
  // x: [N, 3, H, W]. pretrained_networks.py alexnet.forward: slice1 = features[0:2], slice2 = [2:5],
  // slice3 = [5:8], slice4 = [8:10], slice5 = [10:12]; the output of each slice is kept.
  at::Tensor relu1 = at::relu(conv0(x));                                  // [N, c0, H1, W1]
  at::Tensor relu2 = at::relu(conv3(at::max_pool2d(relu1, {3, 3}, {2, 2})));  // [N, c1, H2, W2]
  at::Tensor relu3 = at::relu(conv6(at::max_pool2d(relu2, {3, 3}, {2, 2})));  // [N, c2, H3, W3]
  at::Tensor relu4 = at::relu(conv8(relu3));                              // [N, c3, H3, W3]
  at::Tensor relu5 = at::relu(conv10(relu4));                             // [N, c4, H3, W3]
  return {relu1, relu2, relu3, relu4, relu5};
}

LpipsOutput LpipsImpl::forward(const at::Tensor& in0, const at::Tensor& in1) {
  // in0, in1: [N, 3, H, W]
  if (in0.dim() != 4 || in0.size(1) != 3 || in0.sizes() != in1.sizes())
    throw std::invalid_argument("LPIPS: in0 and in1 must both be [N, 3, H, W] with the same shape, got " + std::string(c10::str(in0.sizes())) +
                                " and " + std::string(c10::str(in1.sizes())));
  // 1. ScalingLayer (version 0.1)
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor shift = at::tensor(at::ArrayRef<float>(kShift, 3), f32).view({1, 3, 1, 1}).to(in0.options());
  at::Tensor scale = at::tensor(at::ArrayRef<float>(kScale, 3), f32).view({1, 3, 1, 1}).to(in0.options());
  at::Tensor x0 = (in0 - shift) / scale;
  at::Tensor x1 = (in1 - shift) / scale;
  // 2. trunk, one image set at a time (LPIPS.forward runs self.net on each input separately)
  LpipsOutput out;
  out.features0 = trunk(x0);
  out.features1 = trunk(x1);
  // 3. per layer: unit-normalise over channels, squared difference, lin_k, spatial mean
  std::vector<at::Tensor> res;
  for (size_t k = 0; k < 5; ++k) {
    at::Tensor d = normalize_tensor(out.features0[k]) - normalize_tensor(out.features1[k]);
    at::Tensor l = lin[k](d * d);                                   // [N, 1, h, w]
    out.lin_out.push_back(l);
    res.push_back(l.mean({2, 3}, /*keepdim=*/true).flatten());       // [N]
  }
  // 4. val = res[0] + res[1] + ... in this order (the loop in LPIPS.forward)
  at::Tensor val = res[0];
  for (size_t k = 1; k < 5; ++k) val = val + res[k];
  out.distance = val;                 // [N]
  out.per_layer = at::stack(res, 1);  // [N, 5]
  return out;
}

namespace {

class LpipsNative : public NativeModel {
 public:
  LpipsNative(const LpipsConfig& cfg, const at::TensorOptions& opts) : model_(cfg, opts) {}
  torch::nn::Module& module() override { return *model_; }
  // "forward": in0, in1 [N, 3, H, W] in [-1, 1] -> distance [N], per_layer [N, 5],
  //   features0.relu{k}, features1.relu{k}, lin_out.relu{k} (k = 1..5)
  TensorMap run(const std::string& method, const TensorMap& inputs) override {
    if (method != "forward") throw std::invalid_argument("lpips: unknown method \"" + method + "\" (expected forward)");
    LpipsOutput r = model_->forward(input(inputs, "in0"), input(inputs, "in1"));
    TensorMap out{{"distance", r.distance}, {"per_layer", r.per_layer}};
    for (size_t k = 0; k < 5; ++k) {
      const std::string relu = "relu" + std::to_string(k + 1);
      out["features0." + relu] = r.features0[k];
      out["features1." + relu] = r.features1[k];
      out["lin_out." + relu] = r.lin_out[k];
    }
    return out;
  }

 private:
  Lpips model_;
};

}  // namespace

std::shared_ptr<NativeModel> make_lpips(const JsonValue& config, const at::TensorOptions& opts) {
  return std::make_shared<LpipsNative>(LpipsConfig::from_json(config), opts);
}

}  // namespace si
