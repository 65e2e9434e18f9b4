// LoRA targets, creation, kohya loading/saving, merging (see lora.h).
//
// References: kohya-ss/sd-scripts networks/lora.py (LoRAModule, LoRANetwork: target modules, key
// names, kaiming-uniform down / zero up, alpha/rank scaling, save metadata) and diffusers 0.25.1
// (models/lora.py LoRACompatibleLinear/Conv: y = W x + b + scale * (alpha / rank) * up(down(x))).
#include "lora.h"
#include "util.h"

#include <torch/csrc/autograd/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>

#include "safetensors.h"

namespace si {

namespace {

constexpr const char* kDownSuffix = "lora_down.weight";
constexpr const char* kUpSuffix = "lora_up.weight";
constexpr const char* kAlphaSuffix = "alpha";

// Module paths each prefix targets. kohya selects the Linear and 1x1 Conv2d children of
// Transformer2DModel (UNet) and of CLIPAttention / CLIPMLP (text encoder); for SD v1.x these are
// exactly the paths below (fixtures README, "lora/").
const std::regex& target_pattern(const std::string& prefix) {
  static const std::regex unet(
      R"(^(.+\.)?attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))$)");
  static const std::regex text(R"(^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$)");
  if (prefix == kLoraUnetPrefix) return unet;
  if (prefix == kLoraTextPrefix) return text;
  throw std::invalid_argument("unknown LoRA prefix \"" + prefix + "\" (expected " + kLoraUnetPrefix + " for the UNet or " + kLoraTextPrefix +
                              " for the text encoder)");
}

// The other SD v1.x prefix: its keys are for the other model, not unknown.
std::string other_prefix(const std::string& prefix) { return prefix == kLoraUnetPrefix ? kLoraTextPrefix : kLoraUnetPrefix; }

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// At most `limit` lines, then "... and N more" (as weights.cc): a broken file must give a readable error.
std::string listing(const std::string& title, const std::vector<std::string>& items, size_t limit = 25) {
  std::ostringstream o;
  o << "\n  " << items.size() << " " << title << ":";
  for (size_t i = 0; i < items.size() && i < limit; ++i) o << "\n    " << items[i];
  if (items.size() > limit) o << "\n    ... and " << items.size() - limit << " more";
  return o.str();
}

// Every si::Linear / si::Conv2d's adapter list, for the functions that act on all adapters.
std::vector<std::pair<LoraAdapters*, at::Tensor*>> all_adapter_lists(torch::nn::Module& module) {
  std::vector<std::pair<LoraAdapters*, at::Tensor*>> out;
  auto add = [&](torch::nn::Module* m) {
    if (auto* l = dynamic_cast<LinearImpl*>(m)) out.emplace_back(&l->lora, &l->weight);
    else if (auto* c = dynamic_cast<Conv2dImpl*>(m)) out.emplace_back(&c->lora, &c->weight);
  };
  add(&module);  // (modules(include_self) would need the root to be held by a shared_ptr)
  for (const auto& m : module.modules(/*include_self=*/false)) add(m.get());
  return out;
}

bool has_adapter(const LoraLayer& layer, const std::string& name) {
  for (const auto& a : layer.adapters())
    if (a->name == name) return true;
  return false;
}

// scale * (alpha / rank) * up @ down, shaped like the layer's weight, in the weight's dtype. The
// product runs in float32 at least, so a half-precision merge does not round twice.
at::Tensor merged_delta(const LoraAdapter& a, const at::Tensor& weight) {
  const at::ScalarType compute = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor up = a.up.detach().to(compute).flatten(1);        // [out, r]
  at::Tensor down = a.down.detach().to(compute).flatten(1);    // [r, in * kh * kw]
  return (at::mm(up, down) * a.multiplier()).view(weight.sizes()).to(weight.scalar_type());
}

void merge(LoraAdapter& a, at::Tensor& weight) {
  torch::NoGradGuard no_grad;  // an in-place update of a parameter, outside autograd
  weight.add_(merged_delta(a, weight));
  a.merged = true;
}

void unmerge(LoraAdapter& a, at::Tensor& weight) {
  torch::NoGradGuard no_grad;
  weight.sub_(merged_delta(a, weight));
  a.merged = false;
}

// Python's str(float) for the values alpha takes in practice (1.0, 0.5, 8.0, 0.125).
std::string python_float(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  std::string s = buf;
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

}  // namespace

std::vector<int64_t> LoraLayer::down_shape(int64_t rank) const {
  if (linear) return {rank, linear->in_features};
  return {rank, conv->in_channels, conv->weight.size(2), conv->weight.size(3)};
}

std::vector<int64_t> LoraLayer::up_shape(int64_t rank) const {
  if (linear) return {linear->out_features, rank};
  return {conv->out_channels, rank, 1, 1};
}

std::vector<LoraLayer> lora_targets(torch::nn::Module& module, const std::string& prefix) {
  const std::regex& pattern = target_pattern(prefix);
  std::map<std::string, LoraLayer> by_name;  // sorted by kohya name
  std::set<const torch::nn::Module*> seen;
  for (const auto& item : module.named_modules("", /*include_self=*/false)) {
    const std::string& path = item.key();
    if (!std::regex_match(path, pattern) || !seen.insert(item.value().get()).second) continue;
    LoraLayer layer;
    layer.path = path;
    layer.linear = std::dynamic_pointer_cast<LinearImpl>(item.value());
    layer.conv = std::dynamic_pointer_cast<Conv2dImpl>(item.value());
    if (!layer.linear && !layer.conv) throw std::logic_error("LoRA target " + path + " is neither si::Linear nor si::Conv2d");
    layer.name = prefix + "_" + path;
    std::replace(layer.name.begin() + prefix.size(), layer.name.end(), '.', '_');
    by_name.emplace(layer.name, std::move(layer));
  }
  if (by_name.empty())
    throw std::invalid_argument("this model has no layer that LoRA prefix \"" + prefix + "\" targets (" + kLoraUnetPrefix +
                                " is for the UNet, " + kLoraTextPrefix + " for the CLIP text encoder)");
  std::vector<LoraLayer> out;
  for (auto& [name, layer] : by_name) out.push_back(std::move(layer));
  return out;
}

std::vector<at::Tensor> create_lora(torch::nn::Module& module, const std::string& prefix, int64_t rank, double alpha, LoraInit init,
                                    const std::string& name, c10::optional<at::Generator> generator, c10::optional<at::ScalarType> dtype) {
  if (rank < 1) throw std::invalid_argument("LoRA rank must be at least 1, got " + std::to_string(rank));
  if (!(alpha > 0) || !std::isfinite(alpha)) throw std::invalid_argument("LoRA alpha must be a positive number, got " + python_float(alpha));
  if (name.empty()) throw std::invalid_argument("a LoRA needs a non-empty name");
  std::vector<LoraLayer> layers = lora_targets(module, prefix);
  for (const auto& layer : layers)
    if (has_adapter(layer, name)) throw std::invalid_argument("a LoRA named \"" + name + "\" is already attached to " + layer.path + "; remove it first");

  torch::NoGradGuard no_grad;  // initialisation is not part of any graph
  std::vector<at::Tensor> params;
  for (const auto& layer : layers) {
    const at::Tensor& w = layer.weight();
    std::vector<int64_t> down_shape = layer.down_shape(rank);
    at::Tensor down = at::empty(down_shape, at::TensorOptions().dtype(at::kFloat));
    if (init == LoraInit::KaimingUniform) {
      // kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + a^2)) = sqrt(1/3), bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)
      int64_t fan_in = 1;
      for (size_t d = 1; d < down_shape.size(); ++d) fan_in *= down_shape[d];
      double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
      down.uniform_(-bound, bound, generator);
    } else {
      down.normal_(0.0, 1.0 / static_cast<double>(rank), generator);
    }
    auto adapter = std::make_shared<LoraAdapter>();
    adapter->name = name;
    adapter->rank = rank;
    adapter->alpha = alpha;
    const at::ScalarType t = dtype.value_or(w.scalar_type());
    adapter->down = down.to(w.device(), t).requires_grad_(true);
    adapter->up = at::zeros(layer.up_shape(rank), w.options().dtype(t)).requires_grad_(true);
    layer.adapters().push_back(adapter);
    params.push_back(adapter->down);
    params.push_back(adapter->up);
  }
  return params;
}

LoraApplyReport apply_lora(torch::nn::Module& module, const std::string& prefix, const TensorMap& tensors, double scale, bool strict,
                           const std::string& name) {
  if (!std::isfinite(scale)) throw std::invalid_argument("LoRA scale must be a finite number");
  if (name.empty()) throw std::invalid_argument("a LoRA needs a non-empty name");
  std::vector<LoraLayer> layers = lora_targets(module, prefix);
  std::map<std::string, const LoraLayer*> by_name;
  for (const auto& layer : layers) by_name[layer.name] = &layer;

  // 1. sort the keys: ours (by layer), the other model's, unknown
  struct Group {
    const at::Tensor *down = nullptr, *up = nullptr, *alpha = nullptr;
  };
  std::map<std::string, Group> groups;
  LoraApplyReport report;
  report.file_tensors = tensors.size();
  const std::string own = prefix + "_", other = other_prefix(prefix) + "_";
  for (const auto& [key, t] : tensors) {
    size_t dot = key.find('.');
    std::string base = key.substr(0, dot), suffix = dot == std::string::npos ? "" : key.substr(dot + 1);
    auto layer = by_name.find(base);
    if (starts_with(key, own) && layer != by_name.end()) {
      Group& g = groups[base];
      if (suffix == kDownSuffix) g.down = &t;
      else if (suffix == kUpSuffix) g.up = &t;
      else if (suffix == kAlphaSuffix) g.alpha = &t;
      else report.unknown.push_back(key);
    } else if (starts_with(key, other)) {
      report.other_tensors++;
    } else {
      report.unknown.push_back(key);
    }
  }

  // 2. check every group against its layer before touching the model
  std::vector<std::string> unpaired, misshaped, bad_alpha, taken;
  for (const auto& [base, g] : groups) {
    const LoraLayer& layer = *by_name.at(base);
    if (has_adapter(layer, name)) taken.push_back(layer.path);
    if (!g.down || !g.up) {
      unpaired.push_back(base + "." + (g.down ? kUpSuffix : kDownSuffix) + " is missing (the file has " + base + "." +
                         (g.down ? kDownSuffix : g.up ? kUpSuffix : kAlphaSuffix) + ")");
      continue;
    }
    const int64_t rank = g.down->dim() > 0 ? g.down->size(0) : 0;
    const std::vector<int64_t> want_down = layer.down_shape(rank), want_up = layer.up_shape(rank);
    if (rank < 1 || g.down->sizes() != at::IntArrayRef(want_down))
      misshaped.push_back(base + "." + kDownSuffix + ": expected " + shape_str(want_down) + " but got " + shape_str(g.down->sizes()));
    else if (g.up->sizes() != at::IntArrayRef(want_up))
      misshaped.push_back(base + "." + kUpSuffix + ": expected " + shape_str(want_up) + " but got " + shape_str(g.up->sizes()));
    if (g.alpha && (g.alpha->numel() != 1 || !g.alpha->is_floating_point()))
      bad_alpha.push_back(base + "." + kAlphaSuffix + ": expected one floating-point number but got " + shape_str(g.alpha->sizes()) + " " +
                          std::string(c10::toString(g.alpha->scalar_type())));
  }
  if (!taken.empty())
    throw std::invalid_argument("a LoRA named \"" + name + "\" is already attached to " + taken.front() + " (and " + std::to_string(taken.size() - 1) +
                                " more layers); remove it first or choose another name");
  if (!unpaired.empty() || !misshaped.empty() || !bad_alpha.empty() || (strict && !report.unknown.empty())) {
    std::string msg = "the LoRA does not fit the " + std::string(prefix == kLoraUnetPrefix ? "UNet" : "text encoder");
    if (!misshaped.empty()) msg += listing("keys with the wrong shape", misshaped);
    if (!unpaired.empty()) msg += listing("incomplete adapters", unpaired);
    if (!bad_alpha.empty()) msg += listing("bad alpha values", bad_alpha);
    if (strict && !report.unknown.empty())
      msg += listing("unknown keys (no " + own + "* target in this model; pass strict=false to skip them)", report.unknown);
    throw std::invalid_argument(msg);
  }

  // 3. attach, in the layer's dtype and device
  for (const auto& [base, g] : groups) {
    const LoraLayer& layer = *by_name.at(base);
    const at::Tensor& w = layer.weight();
    auto adapter = std::make_shared<LoraAdapter>();
    adapter->name = name;
    adapter->rank = g.down->size(0);
    adapter->alpha = g.alpha ? g.alpha->to(at::kDouble).item<double>() : static_cast<double>(adapter->rank);
    adapter->scale = scale;
    adapter->down = g.down->detach().to(w.device(), w.scalar_type()).contiguous();
    adapter->up = g.up->detach().to(w.device(), w.scalar_type()).contiguous();
    layer.adapters().push_back(adapter);
    report.modules++;
    report.tensors += g.alpha ? 3 : 2;
    if (!g.alpha) report.missing_alpha++;
  }
  return report;
}

TensorMap collect_lora(torch::nn::Module& module, const std::string& prefix, const std::string& name) {
  TensorMap out;
  for (const auto& layer : lora_targets(module, prefix)) {
    for (const auto& a : layer.adapters()) {
      if (a->name != name) continue;
      out[layer.name + "." + kDownSuffix] = a->down.detach();
      out[layer.name + "." + kUpSuffix] = a->up.detach();
      // kohya stores alpha as a 0-dim tensor; float32 like the fixture (and kohya's fp32 saves)
      out[layer.name + "." + kAlphaSuffix] = at::scalar_tensor(a->alpha, at::TensorOptions().dtype(at::kFloat));
    }
  }
  return out;
}

std::map<std::string, std::string> lora_metadata(const TensorMap& kohya_tensors) {
  std::set<int64_t> ranks;
  std::set<double> alphas;
  for (const auto& [key, t] : kohya_tensors) {
    size_t dot = key.find('.');
    std::string suffix = dot == std::string::npos ? "" : key.substr(dot + 1);
    if (suffix == kDownSuffix) {
      ranks.insert(t.size(0));
      // a layer without an alpha key has alpha = rank
      if (!kohya_tensors.count(key.substr(0, dot) + "." + kAlphaSuffix)) alphas.insert(static_cast<double>(t.size(0)));
    } else if (suffix == kAlphaSuffix) {
      alphas.insert(t.to(at::kDouble).item<double>());
    }
  }
  // kohya train_network.py writes str(network_dim) and str(network_alpha); resize_lora.py writes
  // "Dynamic" when the layers differ.
  return {
      {"ss_network_module", "networks.lora"},
      {"ss_network_dim", ranks.size() == 1 ? std::to_string(*ranks.begin()) : "Dynamic"},
      {"ss_network_alpha", alphas.size() == 1 ? python_float(*alphas.begin()) : "Dynamic"},
  };
}

void save_lora(const std::string& path, const TensorMap& kohya_tensors, const std::map<std::string, std::string>& extra_metadata) {
  if (kohya_tensors.empty()) throw std::invalid_argument("no LoRA tensors to save to " + path);
  std::map<std::string, std::string> metadata = lora_metadata(kohya_tensors);
  for (const auto& [k, v] : extra_metadata) metadata[k] = v;
  std::vector<std::pair<std::string, at::Tensor>> list;
  for (const auto& [k, t] : kohya_tensors) list.emplace_back(k, t.detach());
  write_safetensors(path, list, metadata);
}

size_t remove_lora(torch::nn::Module& module, const std::string& name) {
  size_t n = 0;
  for (auto& [adapters, weight] : all_adapter_lists(module)) {
    LoraAdapters kept;
    for (auto& a : *adapters) {
      if (!name.empty() && a->name != name) {
        kept.push_back(a);
        continue;
      }
      if (a->merged) unmerge(*a, *weight);
      n++;
    }
    *adapters = std::move(kept);
  }
  return n;
}

size_t set_lora_scale(torch::nn::Module& module, double scale, const std::string& name) {
  if (!std::isfinite(scale)) throw std::invalid_argument("LoRA scale must be a finite number");
  size_t n = 0;
  for (auto& [adapters, weight] : all_adapter_lists(module)) {
    for (auto& a : *adapters) {
      if (!name.empty() && a->name != name) continue;
      const bool was_merged = a->merged;
      if (was_merged) unmerge(*a, *weight);
      a->scale = scale;
      if (was_merged) merge(*a, *weight);
      n++;
    }
  }
  return n;
}

size_t set_lora_enabled(torch::nn::Module& module, bool enabled, const std::string& name) {
  size_t n = 0;
  for (auto& [adapters, weight] : all_adapter_lists(module)) {
    for (auto& a : *adapters) {
      if (!name.empty() && a->name != name) continue;
      // a merged adapter is part of the weight: disabling it takes it out
      if (!enabled && a->merged) unmerge(*a, *weight);
      a->enabled = enabled;
      n++;
    }
  }
  return n;
}

size_t merge_lora(torch::nn::Module& module, const std::string& name) {
  size_t n = 0;
  for (auto& [adapters, weight] : all_adapter_lists(module)) {
    for (auto& a : *adapters) {
      if ((!name.empty() && a->name != name) || a->merged || !a->enabled) continue;
      merge(*a, *weight);
      n++;
    }
  }
  return n;
}

size_t unmerge_lora(torch::nn::Module& module, const std::string& name) {
  size_t n = 0;
  for (auto& [adapters, weight] : all_adapter_lists(module)) {
    for (auto& a : *adapters) {
      if ((!name.empty() && a->name != name) || !a->merged) continue;
      unmerge(*a, *weight);
      n++;
    }
  }
  return n;
}

}  // namespace si
