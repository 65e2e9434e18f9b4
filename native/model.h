// The interface every model port implements, and config readers shared by them.
//
// Configs arrive as JSON text that lib/config.ts has already validated and resolved (every key
// present, unsupported values refused with the file name). The readers below still fail with the
// key name rather than assume a default, so a gap between the two sides is loud.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "json.h"

namespace si {

using TensorMap = std::map<std::string, at::Tensor>;

class NativeModel {
 public:
  virtual ~NativeModel() = default;
  // The root module: its named_parameters() are exactly the checkpoint's state-dict keys.
  virtual torch::nn::Module& module() = 0;
  // One named computation ("forward", "encode", ...) on named inputs. Called under the owning
  // handle's lock, inside NoGradGuard, on a worker thread.
  virtual TensorMap run(const std::string& method, const TensorMap& inputs) = 0;
};

// kind: "unet" | "vae" | "clip_text" | "clip_vision" | "clip" | "vit" | "lpips". Builds with at::empty
// weights on opts' device/dtype ("meta" for manifests); throws std::invalid_argument on an unknown kind.
std::shared_ptr<NativeModel> make_model(const std::string& kind, const JsonValue& config, const at::TensorOptions& opts);

// Per model file (see make_model in models.cc).
std::shared_ptr<NativeModel> make_unet(const JsonValue& config, const at::TensorOptions& opts);
std::shared_ptr<NativeModel> make_vae(const JsonValue& config, const at::TensorOptions& opts);
std::shared_ptr<NativeModel> make_clip_text(const JsonValue& config, const at::TensorOptions& opts);
std::shared_ptr<NativeModel> make_clip_vision(const JsonValue& config, const at::TensorOptions& opts);
std::shared_ptr<NativeModel> make_clip(const JsonValue& config, const at::TensorOptions& opts);
std::shared_ptr<NativeModel> make_vit(const JsonValue& config, const at::TensorOptions& opts);
std::shared_ptr<NativeModel> make_lpips(const JsonValue& config, const at::TensorOptions& opts);

// Config readers: throw std::invalid_argument("config key \"k\": ...") when absent or mistyped.
const JsonValue& cfg_get(const JsonValue& cfg, const std::string& key);
bool cfg_has(const JsonValue& cfg, const std::string& key);
int64_t cfg_int(const JsonValue& cfg, const std::string& key);
double cfg_double(const JsonValue& cfg, const std::string& key);
bool cfg_bool(const JsonValue& cfg, const std::string& key);
std::string cfg_string(const JsonValue& cfg, const std::string& key);
std::vector<int64_t> cfg_int_list(const JsonValue& cfg, const std::string& key);
std::vector<std::string> cfg_string_list(const JsonValue& cfg, const std::string& key);

// Input access for run(): throws std::invalid_argument naming the missing input.
const at::Tensor& input(const TensorMap& inputs, const std::string& name);

}  // namespace si
