// LoRA for the SD v1.x UNet and CLIP text encoder in kohya sd-scripts' `networks.lora` format, the
// format of nearly every SD v1.5 LoRA file: adapters attach to si::Linear / si::Conv2d layers
// (layers.h, LoraAdapter) without becoming registered parameters, so the strict loader and
// named_parameters() are unchanged.
//
// Key names (kohya networks/lora.py, LoRANetwork): `<prefix>_<module path with '.' -> '_'>` plus
//   .lora_down.weight  [r, in] (Linear) or [r, in, kh, kw] (Conv2d)
//   .lora_up.weight    [out, r] or [out, r, 1, 1]
//   .alpha             0-dim; when absent alpha = rank (the update is scaled by alpha / rank)
// e.g. lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight and
// lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight.
//
// Training uses create_lora (trainable adapters, returns the parameters), LoraBypass (the same
// model without LoRA, for a target pass) and collect_lora / save_lora. Inference uses apply_lora,
// set_lora_scale, merge_lora and remove_lora. None of these lock anything: the caller owns the
// model (the JS handle's jobs hold its mutex).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <torch/nn/module.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "layers.h"
#include "model.h"  // TensorMap

namespace si {

// The kohya prefixes SD v1.x files use, without the trailing '_'.
constexpr const char* kLoraUnetPrefix = "lora_unet";  // UNet2DConditionModel
constexpr const char* kLoraTextPrefix = "lora_te";    // CLIPTextModel

// One layer a prefix targets: exactly one of `linear` / `conv` is set.
struct LoraLayer {
  std::string path;  // module path in the model, "down_blocks.0.attentions.0.proj_in"
  std::string name;  // kohya name, "lora_unet_down_blocks_0_attentions_0_proj_in"
  std::shared_ptr<LinearImpl> linear;
  std::shared_ptr<Conv2dImpl> conv;

  LoraAdapters& adapters() const { return linear ? linear->lora : conv->lora; }
  const at::Tensor& weight() const { return linear ? linear->weight : conv->weight; }
  std::vector<int64_t> down_shape(int64_t rank) const;  // [r, in] or [r, in, kh, kw]
  std::vector<int64_t> up_shape(int64_t rank) const;    // [out, r] or [out, r, 1, 1]
};

// The layers `prefix` targets in `module`, sorted by kohya name. Found by module path, as kohya
// and diffusers do:
//   lora_unet: every Transformer2DModel's proj_in, proj_out and, per transformer block, attn1/attn2
//              to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2 (SD v1.5: 192 layers; tiny-sd: 132)
//   lora_te:   every CLIP encoder layer's self_attn.{q,k,v,out}_proj and mlp.{fc1,fc2} (SD v1.5: 72)
// Throws std::invalid_argument for another prefix, or when nothing in `module` matches (wrong model).
std::vector<LoraLayer> lora_targets(torch::nn::Module& module, const std::string& prefix);

// How create_lora initialises `down` (`up` is always zero, so the model starts unchanged).
enum class LoraInit {
  KaimingUniform,  // kohya and PEFT's default: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  Gaussian,        // PEFT's init_lora_weights="gaussian": N(0, 1/r)
};

// Attaches a new trainable adapter named `name` to every target layer: down and up on the layer's
// device, in `dtype` (default: the layer's dtype; training passes float32 so that adapters on bf16/fp16
// layers keep full precision, see add_lora in layers.h), requires_grad = true. Drawn on the CPU in
// float32 (from `generator` when given, so a seed gives the same adapters on every device) in sorted
// kohya-name order. Returns the parameters for the optimizer, in that order: down, up of the first
// layer, then the next layer's. Throws when a LoRA called `name` is already attached, or rank < 1.
std::vector<at::Tensor> create_lora(torch::nn::Module& module, const std::string& prefix, int64_t rank, double alpha,
                                    LoraInit init = LoraInit::KaimingUniform, const std::string& name = "default",
                                    c10::optional<at::Generator> generator = c10::nullopt,
                                    c10::optional<at::ScalarType> dtype = c10::nullopt);

struct LoraApplyReport {
  size_t modules = 0;                // adapters attached
  size_t tensors = 0;                // keys used (down, up and alpha)
  size_t file_tensors = 0;           // keys given
  size_t other_tensors = 0;          // keys for the other SD v1.x model (lora_te_* when applying to the UNet)
  size_t missing_alpha = 0;          // adapters without an alpha key (alpha = rank)
  std::vector<std::string> unknown;  // keys nothing here can use, sorted
};

// Attaches the adapters in `tensors` (kohya keys; the keys of the other SD v1.x prefix are
// counted, not used) as LoRA `name` with strength `scale`, converted to the layer's dtype and device.
// Validates everything before attaching anything, so a refused file leaves the model unchanged.
// Throws std::invalid_argument naming the keys for: a shape that does not fit its layer (expected and
// actual shapes), a down without its up or the reverse, a non-scalar alpha, a LoRA `name` already
// attached, and (strict only) keys that target nothing here (report.unknown when !strict).
LoraApplyReport apply_lora(torch::nn::Module& module, const std::string& prefix, const TensorMap& tensors, double scale = 1.0,
                           bool strict = true, const std::string& name = "default");

// The adapters of LoRA `name` as kohya tensors (down/up detached, alpha a 0-dim F32), for saving.
TensorMap collect_lora(torch::nn::Module& module, const std::string& prefix, const std::string& name = "default");

// kohya metadata for a set of kohya tensors: ss_network_module "networks.lora", ss_network_dim
// (the rank) and ss_network_alpha ("4", "1.0"; "Dynamic" when they differ between layers, as
// kohya's resize_lora.py writes).
std::map<std::string, std::string> lora_metadata(const TensorMap& kohya_tensors);

// Writes kohya tensors (e.g. collect_lora of the UNet and of the text encoder, merged) with
// lora_metadata plus `extra_metadata`, via write_safetensors (sorted keys, atomic rename).
void save_lora(const std::string& path, const TensorMap& kohya_tensors, const std::map<std::string, std::string>& extra_metadata = {});

// The functions below walk every si::Linear / si::Conv2d of `module`, and touch the adapters named
// `name`, or every adapter when `name` is empty. Each returns the number of adapters it touched.

// Detaches adapters (unmerging merged ones first).
size_t remove_lora(torch::nn::Module& module, const std::string& name = "");
size_t set_lora_scale(torch::nn::Module& module, double scale, const std::string& name = "");  // re-merges merged ones
size_t set_lora_enabled(torch::nn::Module& module, bool enabled, const std::string& name = "");
// W += scale * (alpha / rank) * up @ down for fast inference (no extra matmuls), and back.
// Unmerging subtracts the same product, so W returns to within float rounding of its old value.
// Adapters that are disabled stay unmerged; a merged adapter must not require grad for training.
size_t merge_lora(torch::nn::Module& module, const std::string& name = "");
size_t unmerge_lora(torch::nn::Module& module, const std::string& name = "");

// While alive, every forward on this thread runs without its (unmerged) adapters, as if no LoRA were
// attached; merged adapters make that forward throw. For training: the L_sm target pass.
//   { si::LoraBypass off; torch::NoGradGuard no_grad; target = unet->forward(...); }
class LoraBypass {
 public:
  LoraBypass() : previous_(lora_bypassed()) { lora_bypassed() = true; }
  ~LoraBypass() { lora_bypassed() = previous_; }
  LoraBypass(const LoraBypass&) = delete;
  LoraBypass& operator=(const LoraBypass&) = delete;

 private:
  bool previous_;
};

}  // namespace si
