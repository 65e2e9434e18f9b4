// SingleInsert training: AdamW, the two-stage trainer and the golden loss case (see train.h).
#include "train.h"
#include "util.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>
#include <stdexcept>

#include "clip.h"
#include "json.h"
#include "lora.h"
#include "losses.h"
#include "safetensors.h"
#include "schedulers.h"
#include "unet.h"
#include "vae.h"

namespace si {

namespace fs = std::filesystem;

namespace {

// The checkpoint's file names and format tag.
constexpr const char* kCheckpointFormat = "singleinsert-native.checkpoint";
constexpr int kCheckpointVersion = 1;
constexpr const char* kStateFile = "trainer.json";
constexpr const char* kMetaFile = "meta.json";
constexpr const char* kEncoderFile = "encoder.safetensors";
constexpr const char* kLoraFile = "lora.safetensors";
constexpr const char* kOptimizerFile = "optimizer.safetensors";
// Prefixes of the optimizer's parameter names (checkpoint keys).
constexpr const char* kEncoderParamPrefix = "encoder.";
constexpr const char* kLoraParamPrefix = "lora.";
// derive_seed purposes (the second word is 0): the step streams use the stage (1, 2) instead.
constexpr uint64_t kSeedEncoderInit = 0x656e636f646572;  // "encoder"
constexpr uint64_t kSeedLoraInit = 0x6c6f7261;           // "lora"

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

at::Generator cpu_generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

std::string number_str(double v) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

UNet2DConditionModelImpl& unet_of(LoadedModel& m) { return dynamic_cast<UNet2DConditionModelImpl&>(m.model->module()); }
AutoencoderKLImpl& vae_of(LoadedModel& m) { return dynamic_cast<AutoencoderKLImpl&>(m.model->module()); }
ClipTextModelImpl& text_of(LoadedModel& m) { return dynamic_cast<ClipTextModelImpl&>(m.model->module()); }

// Frozen base weights: no gradient is ever accumulated into them (only the conditioning, the
// encoder and the LoRA adapters, which are not registered parameters, require grad).
void freeze(torch::nn::Module& module) {
  for (auto& p : module.parameters(/*recurse=*/true)) p.requires_grad_(false);
}

// Training needs the three models on one device, each in fp32, bf16 or fp16 (fp16 on CUDA only).
void check_models(const LoadedModel& unet, const LoadedModel& vae, const LoadedModel& text) {
  for (const LoadedModel* m : {&unet, &vae, &text}) {
    const at::ScalarType t = m->opts.dtype().toScalarType();
    if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf)
      throw std::invalid_argument("training needs fp32, bf16 or fp16 models, but the " + m->kind + " model is " + std::string(c10::toString(t)));
    if (half_on_cpu(m->opts))
      throw std::invalid_argument("fp16 needs CUDA; use bf16 on CPU (the " + m->kind + " model is fp16 on the CPU, where libtorch lacks fp16 kernels)");
    if (m->opts.device() != unet.opts.device())
      throw std::invalid_argument("the unet, vae and clip_text models must be on one device (unet: " + unet.opts.device().str() + ", " + m->kind +
                                  ": " + m->opts.device().str() + ")");
  }
}

// A LoRA already on the models would be trained against (stage I) or bypassed with ours (stage II).
void check_no_lora(torch::nn::Module& module, const std::string& prefix, const std::string& what) {
  for (const auto& layer : lora_targets(module, prefix)) {
    if (!layer.adapters().empty())
      throw std::invalid_argument("the " + what + " has LoRA \"" + layer.adapters().front()->name + "\" attached (" + layer.path +
                                  "); remove it (clearLora) before training: SingleInsert trains against the base model");
  }
}

NoiseSchedule schedule_from_json(const std::string& json) {
  JsonValue cfg = parse_json(json.data(), json.size());
  return NoiseSchedule::from_config(BetaScheduleConfig::from_json(cfg));
}

// The adapters named `name` on the prefix's target layers, with their kohya names.
std::vector<std::pair<std::string, std::shared_ptr<LoraAdapter>>> named_adapters(torch::nn::Module& module, const std::string& prefix,
                                                                                const std::string& name) {
  std::vector<std::pair<std::string, std::shared_ptr<LoraAdapter>>> out;
  for (const auto& layer : lora_targets(module, prefix))
    for (const auto& a : layer.adapters())
      if (a->name == name) out.emplace_back(layer.name, a);
  return out;
}

std::string read_text_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_text_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error("cannot write " + path.string());
  out << text;
  out.close();
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

// A sibling name unique within this process: "<name>.<tag>-<time>-<n>".
fs::path sibling(const fs::path& target, const std::string& tag) {
  static std::atomic<uint64_t> counter{0};
  const auto now = std::chrono::steady_clock::now().time_since_epoch().count();
  return target.parent_path() / (target.filename().string() + "." + tag + "-" + std::to_string(now) + "-" + std::to_string(counter++));
}

std::vector<std::pair<std::string, at::Tensor>> cpu_copies(const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& [k, t] : tensors) out.emplace_back(k, t.detach().to(at::kCPU).contiguous());
  return out;
}

}  // namespace

uint64_t derive_seed(uint64_t seed, uint64_t a, uint64_t b) { return splitmix64(splitmix64(splitmix64(seed) ^ a) ^ b); }

// ---------------------------------------------------------------- AdamW

AdamW::AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions options) : options_(options) {
  for (auto& [name, t] : params) {
    Param p;
    p.name = name;
    p.tensor = t;
    params_.push_back(std::move(p));
  }
}

void AdamW::zero_grad() {
  for (auto& p : params_) p.tensor.mutable_grad() = at::Tensor();
}

at::Tensor AdamW::grad_norm() {
  // torch/nn/utils/clip_grad.py (1.13), norm_type 2, error_if_nonfinite False
  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> norms;
  for (auto& p : params_)
    if (p.tensor.grad().defined()) norms.push_back(at::norm(p.tensor.grad().detach(), 2));
  if (norms.empty()) return at::Tensor();
  return at::norm(at::stack(norms), 2);
}

void AdamW::clip_grad(const at::Tensor& total, double max_norm) {
  if (!total.defined()) return;
  torch::NoGradGuard no_grad;
  // `max_norm / (total_norm + 1e-6)` is Tensor.__rtruediv__: reciprocal() * max_norm
  at::Tensor coef = (total + 1e-6).reciprocal() * max_norm;
  at::Tensor clamped = at::clamp(coef, c10::nullopt, 1.0);
  for (auto& p : params_)
    if (p.tensor.grad().defined()) p.tensor.grad().detach().mul_(clamped);
}

void AdamW::scale_grads(double factor) {
  torch::NoGradGuard no_grad;
  for (auto& p : params_)
    if (p.tensor.grad().defined()) p.tensor.grad().detach().mul_(factor);
}

double AdamW::clip_grad_norm(double max_norm) {
  at::Tensor total = grad_norm();
  if (!total.defined()) return 0.0;
  clip_grad(total, max_norm);
  return total.item<double>();
}

void AdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  const AdamWOptions& o = options_;
  for (auto& p : params_) {
    const at::Tensor& grad = p.tensor.grad();
    if (!grad.defined()) continue;
    if (!p.exp_avg.defined()) {
      p.exp_avg = at::zeros_like(p.tensor, at::MemoryFormat::Preserve);
      p.exp_avg_sq = at::zeros_like(p.tensor, at::MemoryFormat::Preserve);
    }
    at::Tensor param = p.tensor.detach();
    // _single_tensor_adamw, in its order of operations
    p.step += 1;
    param.mul_(1 - lr * o.weight_decay);
    p.exp_avg.mul_(o.beta1).add_(grad, 1 - o.beta1);
    p.exp_avg_sq.mul_(o.beta2).addcmul_(grad, grad, 1 - o.beta2);
    const double step = static_cast<double>(p.step);
    const double bias_correction1 = 1 - std::pow(o.beta1, step);
    const double bias_correction2 = 1 - std::pow(o.beta2, step);
    const double step_size = lr / bias_correction1;
    const double bias_correction2_sqrt = std::sqrt(bias_correction2);
    at::Tensor denom = (p.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(o.eps);
    param.addcdiv_(p.exp_avg, denom, -step_size);
  }
}

// ---------------------------------------------------------------- trainer

struct SingleInsertTrainer::Locks {
  // std::scoped_lock avoids deadlock against jobs that take these mutexes in another order
  explicit Locks(SingleInsertTrainer& t) : lock(t.unet_->mutex, t.vae_->mutex, t.text_->mutex) {}
  std::scoped_lock<std::mutex, std::mutex, std::mutex> lock;
};

SingleInsertTrainer::SingleInsertTrainer(std::shared_ptr<LoadedModel> unet, std::shared_ptr<LoadedModel> vae, std::shared_ptr<LoadedModel> text,
                                         TrainerInputs inputs, TrainerConfig config)
    : unet_(std::move(unet)), vae_(std::move(vae)), text_(std::move(text)), inputs_(std::move(inputs)), config_(std::move(config)) {
  check_models(*unet_, *vae_, *text_);
  opts_ = at::TensorOptions().dtype(at::kFloat).device(unet_->opts.device());
  unet_dtype_ = unet_->opts.dtype().toScalarType();
  vae_dtype_ = vae_->opts.dtype().toScalarType();
  text_dtype_ = text_->opts.dtype().toScalarType();
  loss_scaling_ = unet_dtype_ == at::kHalf || vae_dtype_ == at::kHalf || text_dtype_ == at::kHalf;
  const TrainerInputs& in = inputs_;
  auto check = [](bool ok, const std::string& msg) {
    if (!ok) throw std::invalid_argument(msg);
  };
  check(in.image.dim() == 4 && in.image.size(0) == 1 && in.image.size(1) == 3, "trainer: image must be [1, 3, H, W], got " + shape_str(in.image.sizes()));
  check(in.mask_latent.dim() == 4 && in.mask_latent.size(0) == 1 && in.mask_latent.size(1) == 1,
        "trainer: maskLatent must be [1, 1, h, w], got " + shape_str(in.mask_latent.sizes()));
  check(in.encoder_pixels.dim() == 4 && in.encoder_pixels.size(0) == 1 && in.encoder_pixels.size(1) == 3,
        "trainer: encoderPixels must be [1, 3, S, S], got " + shape_str(in.encoder_pixels.sizes()));
  for (const at::Tensor* ids : {&in.ids_star, &in.ids_class})
    check(ids->dim() == 2 && ids->size(0) == 1 && ids->scalar_type() == at::kLong,
          "trainer: token ids must be int64 [1, L], got " + std::string(c10::toString(ids->scalar_type())) + " " + shape_str(ids->sizes()));
  check(!in.placeholder_positions.empty(), "trainer: the training prompt has no placeholder position");
  for (int64_t p : in.placeholder_positions)
    check(p > 0 && p < in.ids_star.size(1), "trainer: placeholder position " + std::to_string(p) + " lies outside the prompt's ids");
  check(std::isfinite(config_.gamma) && config_.gamma >= 0 && std::isfinite(config_.eta) && config_.eta >= 0,
        "trainer: gamma and eta must be finite and non-negative");
}

SingleInsertTrainer::~SingleInsertTrainer() {
  try {
    dispose();
  } catch (...) {
    // a destructor must not throw; dispose() only fails when the models are gone
  }
}

void SingleInsertTrainer::check_usable() const {
  if (disposed_) throw std::logic_error("this trainer was disposed");
  if (!initialized_) throw std::logic_error("the trainer is not initialised (call init() first)");
}

void SingleInsertTrainer::check_batch(const at::Tensor& timesteps, const at::Tensor& noise, const char* what) const {
  const int64_t N = alphas_cumprod_.size(0);
  if (!timesteps.defined() || timesteps.dim() != 1 || timesteps.scalar_type() != at::kLong || timesteps.size(0) < 1)
    throw std::invalid_argument(std::string(what) + ": timesteps must be int64 [B] with B >= 1");
  if (timesteps.min().item<int64_t>() < 0 || timesteps.max().item<int64_t>() >= N)
    throw std::invalid_argument(std::string(what) + ": timesteps must lie in [0, " + std::to_string(N) + ")");
  const std::vector<int64_t> want{timesteps.size(0), x0_.size(1), x0_.size(2), x0_.size(3)};
  if (!noise.defined() || noise.sizes() != at::IntArrayRef(want) || noise.scalar_type() != at::kFloat)
    throw std::invalid_argument(std::string(what) + ": noise must be float32 " + shape_str(want) + (noise.defined() ? ", got " + shape_str(noise.sizes()) : ""));
}

std::vector<int64_t> SingleInsertTrainer::latent_shape() const { return x0_.defined() ? x0_.sizes().vec() : std::vector<int64_t>{}; }

int64_t SingleInsertTrainer::encoder_parameters() {
  std::lock_guard<std::mutex> self(mutex_);
  int64_t n = 0;
  if (encoder_)
    for (const auto& p : encoder_->parameters()) n += p.numel();
  return n;
}

TrainerState SingleInsertTrainer::state() {
  std::lock_guard<std::mutex> self(mutex_);
  return state_;
}

PrecisionInfo SingleInsertTrainer::precision() const {
  return PrecisionInfo{dtype_name(unet_dtype_), dtype_name(vae_dtype_), dtype_name(text_dtype_), loss_scaling_};
}

DynamicLossScaler SingleInsertTrainer::loss_scaler() {
  std::lock_guard<std::mutex> self(mutex_);
  return scaler_;
}

void SingleInsertTrainer::init() {
  std::lock_guard<std::mutex> self(mutex_);
  if (disposed_) throw std::logic_error("this trainer was disposed");
  if (initialized_) throw std::logic_error("init() was already called");
  Locks locks(*this);
  UNet2DConditionModelImpl& unet = unet_of(*unet_);
  AutoencoderKLImpl& vae = vae_of(*vae_);
  ClipTextModelImpl& text = text_of(*text_);

  // 1. the base models: no LoRA of someone else's, frozen
  check_no_lora(unet, kLoraUnetPrefix, "UNet");
  check_no_lora(text, kLoraTextPrefix, "text encoder");
  freeze(unet);
  freeze(vae);
  freeze(text);
  hidden_ = text.text_model->cfg.encoder.hidden_size;

  // 2. the DDPM training table ᾱ (scheduling_ddpm.py), float32
  alphas_cumprod_ = schedule_from_json(config_.schedule_config).alphas_cumprod.to(opts_.device());

  // 3. the image encoder: seeded random init (head included), then the pretrained weights if any
  JsonValue ecfg = parse_json(config_.encoder_config.data(), config_.encoder_config.size());
  SingleInsertEncoder encoder = make_singleinsert_encoder(ecfg, opts_);
  if (encoder->head->out_features != hidden_)
    throw std::invalid_argument("the image encoder's head_out " + std::to_string(encoder->head->out_features) + " differs from the text encoder's hidden size " +
                                std::to_string(hidden_));
  const int64_t S = encoder->config.image_size;
  if (inputs_.encoder_pixels.size(2) != S || inputs_.encoder_pixels.size(3) != S)
    throw std::invalid_argument("trainer: encoderPixels are " + shape_str(inputs_.encoder_pixels.sizes()) + " but the image encoder takes " +
                                std::to_string(S) + "x" + std::to_string(S));
  init_singleinsert_encoder(*encoder, cpu_generator(derive_seed(config_.seed, kSeedEncoderInit, 0)));
  if (!config_.encoder_weights.empty()) load_singleinsert_encoder(*encoder, config_.encoder_weights);
  encoder->train();
  for (auto& p : encoder->parameters()) p.requires_grad_(true);

  // 4. constants: x0 from the latent mean (not a sample), the class prompt without LoRA, the inputs on
  //    the device; computed in each model's dtype, kept in float32
  {
    torch::NoGradGuard no_grad;
    at::Tensor image = inputs_.image.to(opts_.device(), vae_dtype_);
    x0_ = vae.encode(image).mean.to(at::kFloat) * vae.scaling_factor;  // [1, 4, h, w]
    if (vae_dtype_ == at::kHalf && !at::isfinite(x0_).all().item<bool>()) {
      // SD v1.5's VAE can overflow in fp16 (generate.cc redoes such decodes in fp32): encode once
      // more with the weights cast to fp32 for the call and back (exact both ways)
      vae.to(at::kFloat);
      try {
        x0_ = vae.encode(inputs_.image.to(opts_)).mean * vae.scaling_factor;
      } catch (...) {
        vae.to(vae_dtype_);
        throw;
      }
      vae.to(vae_dtype_);
    }
    ids_star_ = inputs_.ids_star.to(opts_.device());
    ids_class_ = inputs_.ids_class.to(opts_.device());
    e_class_frozen_ = text.forward(ids_class_).last_hidden_state.to(at::kFloat);  // [1, 77, C]
  }
  mask_ = inputs_.mask_latent.to(opts_);
  if (mask_.size(2) != x0_.size(2) || mask_.size(3) != x0_.size(3))
    throw std::invalid_argument("trainer: maskLatent is " + shape_str(mask_.sizes()) + " but the latents are " + shape_str(x0_.sizes()));
  pixels_ = inputs_.encoder_pixels.to(opts_);
  std::vector<int64_t> rows;
  for (int64_t p : inputs_.placeholder_positions) rows.insert(rows.end(), {0, p});
  replace_index_ = at::tensor(rows, at::TensorOptions().dtype(at::kLong)).view({-1, 2}).to(opts_.device());

  encoder_ = encoder;
  // 5. the stage-I optimizer over the encoder; a fresh loss scale and memory peak
  optimizer_ = std::make_unique<AdamW>(trainable_parameters(), AdamWOptions{});
  state_ = TrainerState{};
  scaler_ = DynamicLossScaler{};
  reset_peak_memory(opts_.device());
  initialized_ = true;
}

std::vector<std::pair<std::string, at::Tensor>> SingleInsertTrainer::trainable_parameters() {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : encoder_->named_parameters(true)) out.emplace_back(kEncoderParamPrefix + p.key(), p.value());
  if (state_.lora) {
    const std::vector<std::pair<torch::nn::Module*, std::string>> models{{&unet_->model->module(), kLoraUnetPrefix},
                                                                         {&text_->model->module(), kLoraTextPrefix}};
    for (const auto& [module, prefix] : models) {
      for (const auto& [name, a] : named_adapters(*module, prefix, kTrainerLoraName)) {
        out.emplace_back(std::string(kLoraParamPrefix) + name + ".lora_down.weight", a->down);
        out.emplace_back(std::string(kLoraParamPrefix) + name + ".lora_up.weight", a->up);
      }
    }
  }
  return out;
}

at::Tensor SingleInsertTrainer::encode_star(const at::Tensor& v) {
  // v: [1, C] float32 -> e*: [1, 77, C] float32, the `*` token embedding replaced by v at every
  // placeholder position; v enters in the text encoder's dtype (the cast passes gradients back)
  return text_of(*text_).forward(ids_star_, replace_index_, v.reshape({-1}).to(text_dtype_)).last_hidden_state.to(at::kFloat);
}

at::Tensor SingleInsertTrainer::unet_forward(const at::Tensor& x, const at::Tensor& t, const at::Tensor& context) {
  // x: [n, 4, h, w] float32; context: [1, 77, C] float32, the same for every element -> expanded to
  // the batch; both cast to the UNet's dtype, the noise prediction back to float32
  at::Tensor ctx = context.expand({x.size(0), context.size(1), context.size(2)});
  return unet_of(*unet_).forward(x.to(unet_dtype_), t, ctx.to(unet_dtype_)).to(at::kFloat);
}

namespace {

// Sets the UNet's gradient_checkpointing for a scope: the switch lives on the shared model, so the
// trainer turns it on only around its own passes (it holds the UNet's lock meanwhile).
class CheckpointingScope {
 public:
  CheckpointingScope(UNet2DConditionModelImpl& unet, bool on) : unet_(unet), previous_(unet.gradient_checkpointing) { unet.gradient_checkpointing = on; }
  ~CheckpointingScope() { unet_.gradient_checkpointing = previous_; }
  CheckpointingScope(const CheckpointingScope&) = delete;
  CheckpointingScope& operator=(const CheckpointingScope&) = delete;

 private:
  UNet2DConditionModelImpl& unet_;
  bool previous_;
};

Losses losses_from(const at::Tensor& host) {
  // host: [4] float64 on the CPU: fg, bg, sm, total
  const double* v = host.data_ptr<double>();
  return Losses{v[0], v[1], v[2], v[3]};
}

}  // namespace

at::Tensor SingleInsertTrainer::run_batch(int stage, const at::Tensor& timesteps, const at::Tensor& noise, int64_t micro_batch, bool train,
                                          double loss_scale) {
  const int64_t B = timesteps.size(0);
  const int64_t micro = micro_batch > 0 ? std::min(micro_batch, B) : B;
  CheckpointingScope checkpointing(unet_of(*unet_), config_.grad_checkpointing);

  // 1. the placeholder embedding and the prompt encodings: once per batch
  at::Tensor v = encoder_->embed(pixels_);                                                            // [1, C]
  at::Tensor e_star = encode_star(v);                                                                 // [1, 77, C]
  at::Tensor e_class = stage == 2 ? text_of(*text_).forward(ids_class_).last_hidden_state.to(at::kFloat) : e_class_frozen_;  // [1, 77, C]
  // Leaves at the conditioning: each micro-batch backpropagates into them, and their summed
  // gradients go through the text encoder and the image encoder once, at the end.
  at::Tensor e_star_leaf = train ? e_star.detach().requires_grad_(true) : e_star;
  at::Tensor e_class_leaf = train && stage == 2 ? e_class.detach().requires_grad_(true) : e_class;

  // Σ (n/B)·[fg, bg, sm, total] in float64 on the device: read once by the caller, not per micro-batch
  at::Tensor sum = at::zeros({4}, opts_.dtype(at::kDouble));
  for (int64_t start = 0; start < B; start += micro) {
    const int64_t n = std::min(micro, B - start);
    const double weight = static_cast<double>(n) / static_cast<double>(B);  // mean over the batch = Σ (n/B)·mean over the chunk
    at::Tensor t = timesteps.narrow(0, start, n);
    at::Tensor eps = noise.narrow(0, start, n);
    // 2. forward diffusion: x_t = √ᾱ·x0 + √(1−ᾱ)·ε   [n, 4, h, w]
    at::Tensor ab = alphas_cumprod_.index_select(0, t);
    at::Tensor x0 = x0_.expand({n, x0_.size(1), x0_.size(2), x0_.size(3)});
    at::Tensor x_t = add_noise(alphas_cumprod_, x0, eps, t);
    // 3. x̂[* class] (eq. 3) and L_fg (eq. 4)
    at::Tensor x_star = predict_x0(x_t, unet_forward(x_t, t, e_star_leaf), ab);
    at::Tensor fg = config_.fg_norm == FgNorm::Mask ? loss_fg_masknorm(x_star, x0, mask_) : loss_fg(x_star, x0, mask_);
    at::Tensor bg, sm;
    if (stage == 1) {
      // 4a. stage I: L_bg's target is the frozen model's x̂[class] (eq. 5)
      at::Tensor x_class;
      {
        torch::NoGradGuard no_grad;
        x_class = predict_x0(x_t, unet_forward(x_t, t, e_class_frozen_), ab);
      }
      bg = loss_bg(x_star, x_class, mask_);
      sm = at::zeros({}, opts_);
    } else {
      // 4b. stage II: x̂_lora[class] feeds L_sm (eq. 6) and, detached, L_bg; L_sm's target is the same
      //     UNet with its LoRA bypassed (not a second copy of the model), without grad
      at::Tensor x_class_lora = predict_x0(x_t, unet_forward(x_t, t, e_class_leaf), ab);
      at::Tensor x_class_frozen;
      {
        LoraBypass bypass;
        torch::NoGradGuard no_grad;
        x_class_frozen = predict_x0(x_t, unet_forward(x_t, t, e_class_frozen_), ab);
      }
      bg = loss_bg(x_star, x_class_lora, mask_);
      sm = loss_sm(x_class_lora, x_class_frozen);
    }
    // 5. eq. 7 (fp16: the backward pass sees the scaled loss, see DynamicLossScaler)
    at::Tensor total = fg + config_.gamma * bg + config_.eta * sm;
    if (train) (total * (weight * loss_scale)).backward();
    sum = sum + at::stack({fg.detach(), bg.detach(), sm.detach(), total.detach()}).to(at::kDouble) * weight;
  }

  // 6. through the text encoder (its LoRA in stage II) and the image encoder
  if (train) {
    std::vector<at::Tensor> roots{e_star}, grads{e_star_leaf.grad()};
    if (stage == 2 && e_class_leaf.grad().defined()) {
      roots.push_back(e_class);
      grads.push_back(e_class_leaf.grad());
    }
    torch::autograd::backward(roots, grads);
  }
  return sum;
}

StepResult SingleInsertTrainer::step(const StepOptions& o) {
  std::lock_guard<std::mutex> self(mutex_);
  check_usable();
  if (o.stage != 1 && o.stage != 2) throw std::invalid_argument("step: stage must be 1 or 2, got " + std::to_string(o.stage));
  if (o.stage == 1 && state_.lora) throw std::invalid_argument("step: stage I steps cannot follow stage II (the LoRA is attached)");
  if (o.stage == 2 && !state_.lora) throw std::invalid_argument("step: stage II needs startStage2() first");
  if (o.batch < 1) throw std::invalid_argument("step: batch must be at least 1, got " + std::to_string(o.batch));
  if (o.micro_batch < 0) throw std::invalid_argument("step: microBatch must be non-negative, got " + std::to_string(o.micro_batch));
  if (!(o.lr > 0) || !std::isfinite(o.lr)) throw std::invalid_argument("step: lr must be a positive finite number, got " + number_str(o.lr));
  const int64_t done = state_.steps_done[o.stage - 1];
  if (o.step != done)
    throw std::invalid_argument("step: expected step " + std::to_string(done) + " of stage " + std::to_string(o.stage) + " (steps run in order), got " +
                                std::to_string(o.step));
  Locks locks(*this);

  // 1. this step's randomness, from (seed, stage, step) alone: t ~ U{0..N-1} and ε ~ N(0, I) per element
  at::Tensor t = o.timesteps, noise = o.noise;
  if (t.defined() || noise.defined()) {
    check_batch(t, noise, "step");
  } else {
    at::Generator gen = cpu_generator(derive_seed(config_.seed, static_cast<uint64_t>(o.stage), static_cast<uint64_t>(o.step)));
    const int64_t N = alphas_cumprod_.size(0);
    t = at::randint(0, N, {o.batch}, gen, at::TensorOptions().dtype(at::kLong));
    noise = at::randn({o.batch, x0_.size(1), x0_.size(2), x0_.size(3)}, gen, at::TensorOptions().dtype(at::kFloat));
  }

  // 2. gradients of the batch (of the scaled loss with fp16)
  optimizer_->zero_grad();
  StepResult r;
  const double scale = loss_scaling_ ? scaler_.scale : 1.0;
  at::Tensor losses = run_batch(o.stage, t.to(opts_.device()), noise.to(opts_.device()), o.micro_batch, /*train=*/true, scale);
  // 3. unscale (fp16), the norm, and with fp16 the skip decision: inf/NaN gradients skip the update
  if (loss_scaling_) {
    r.loss_scale = scale;
    optimizer_->scale_grads(1.0 / scale);
  }
  if (o.return_gradients)
    for (const auto& p : optimizer_->params())
      if (p.tensor.grad().defined()) r.gradients.emplace_back(p.name, p.tensor.grad().detach().to(at::kCPU).clone());
  at::Tensor norm = optimizer_->grad_norm();
  bool apply = true;
  if (loss_scaling_) apply = scaler_.update(!norm.defined() || std::isfinite(norm.item<double>()));
  // 4. clipping and AdamW
  if (apply) {
    optimizer_->clip_grad(norm, kMaxGradNorm);
    optimizer_->step(o.lr);
  }
  r.skipped = !apply;
  optimizer_->zero_grad();
  state_.steps_done[o.stage - 1]++;
  // 5. the step's numbers to the host, in one copy
  at::Tensor norm64 = norm.defined() ? norm.detach().to(at::kDouble).reshape({1}) : at::zeros({1}, losses.options());
  at::Tensor host = at::cat({losses, norm64}).to(at::kCPU);
  r.losses = losses_from(host);
  r.grad_norm = host.data_ptr<double>()[4];
  r.memory = memory_stats(opts_.device());
  return r;
}

std::pair<size_t, int64_t> SingleInsertTrainer::attach_lora(int64_t rank, double alpha) {
  // one generator for both models, in a fixed order: the same seed gives the same adapters
  at::Generator gen = cpu_generator(derive_seed(config_.seed, kSeedLoraInit, 0));
  // float32 adapters whatever the layers' dtype: they are trained (see add_lora in layers.h)
  std::vector<at::Tensor> params =
      create_lora(unet_->model->module(), kLoraUnetPrefix, rank, alpha, LoraInit::KaimingUniform, kTrainerLoraName, gen, at::kFloat);
  try {
    std::vector<at::Tensor> te =
        create_lora(text_->model->module(), kLoraTextPrefix, rank, alpha, LoraInit::KaimingUniform, kTrainerLoraName, gen, at::kFloat);
    params.insert(params.end(), te.begin(), te.end());
  } catch (...) {
    remove_lora(unet_->model->module(), kTrainerLoraName);
    throw;
  }
  int64_t numel = 0;
  for (const auto& p : params) numel += p.numel();
  state_.lora = true;
  state_.lora_rank = rank;
  state_.lora_alpha = alpha;
  return {params.size() / 2, numel};
}

std::pair<size_t, int64_t> SingleInsertTrainer::start_stage2(int64_t rank, double alpha) {
  std::lock_guard<std::mutex> self(mutex_);
  check_usable();
  if (state_.lora) throw std::invalid_argument("startStage2: stage II already started");
  Locks locks(*this);
  auto counts = attach_lora(rank, alpha);
  // a new optimizer per stage (see train.h)
  optimizer_ = std::make_unique<AdamW>(trainable_parameters(), AdamWOptions{});
  state_.stage = 2;
  return counts;
}

Losses SingleInsertTrainer::evaluate(const at::Tensor& timesteps, const at::Tensor& noise, int64_t micro_batch) {
  std::lock_guard<std::mutex> self(mutex_);
  check_usable();
  check_batch(timesteps, noise, "evaluate");
  Locks locks(*this);
  torch::NoGradGuard no_grad;
  return losses_from(run_batch(state_.stage, timesteps.to(opts_.device()), noise.to(opts_), micro_batch, /*train=*/false, 1.0).to(at::kCPU));
}

at::Tensor SingleInsertTrainer::embedding() {
  std::lock_guard<std::mutex> self(mutex_);
  check_usable();
  torch::NoGradGuard no_grad;
  return encoder_->embed(pixels_).to(at::kCPU).contiguous();
}

void SingleInsertTrainer::save_checkpoint(const std::string& dir, const std::string& meta_json) {
  std::lock_guard<std::mutex> self(mutex_);
  check_usable();
  JsonValue meta = parse_json(meta_json.data(), meta_json.size());
  if (meta.kind != JsonValue::Object) throw std::invalid_argument("saveCheckpoint: meta must be a JSON object");
  Locks locks(*this);
  torch::NoGradGuard no_grad;

  fs::path target = fs::absolute(fs::path(dir)).lexically_normal();
  if (target.filename().empty()) target = target.parent_path();  // "dir/" names "dir"
  fs::create_directories(target.parent_path());
  const fs::path tmp = sibling(target, "tmp");
  fs::create_directory(tmp);
  try {
    // 1. encoder weights under their checkpoint keys
    std::vector<std::pair<std::string, at::Tensor>> encoder;
    for (const auto& p : encoder_->named_parameters(true)) encoder.emplace_back(p.key(), p.value());
    write_safetensors((tmp / kEncoderFile).string(), cpu_copies(encoder), {});
    // 2. LoRA (kohya keys, UNet and text encoder together)
    if (state_.lora) {
      TensorMap lora = collect_lora(unet_->model->module(), kLoraUnetPrefix, kTrainerLoraName);
      for (auto& [k, t] : collect_lora(text_->model->module(), kLoraTextPrefix, kTrainerLoraName)) lora[k] = t;
      save_lora((tmp / kLoraFile).string(), lora, {});
    }
    // 3. AdamW: <param>.exp_avg, <param>.exp_avg_sq, <param>.step (int64) for every parameter with state
    std::vector<std::pair<std::string, at::Tensor>> moments;
    for (const auto& p : optimizer_->params()) {
      if (!p.exp_avg.defined()) continue;
      moments.emplace_back(p.name + ".exp_avg", p.exp_avg);
      moments.emplace_back(p.name + ".exp_avg_sq", p.exp_avg_sq);
      moments.emplace_back(p.name + ".step", at::scalar_tensor(p.step, at::TensorOptions().dtype(at::kLong)));
    }
    write_safetensors((tmp / kOptimizerFile).string(), cpu_copies(moments), {{"stage", std::to_string(state_.stage)}});
    // 4. counters, and the caller's meta verbatim
    std::ostringstream s;
    s << "{\n  \"format\": \"" << kCheckpointFormat << "\",\n  \"version\": " << kCheckpointVersion << ",\n  \"seed\": \"" << config_.seed
      << "\",\n  \"stage\": " << state_.stage << ",\n  \"steps_done\": [" << state_.steps_done[0] << ", " << state_.steps_done[1] << "],\n  \"lora\": ";
    if (state_.lora)
      s << "{\"rank\": " << state_.lora_rank << ", \"alpha\": " << number_str(state_.lora_alpha) << ", \"name\": \"" << kTrainerLoraName << "\"}";
    else
      s << "null";
    // fp16: the loss scaler, so that a resumed run scales as the uninterrupted one would
    s << ",\n  \"loss_scale\": ";
    if (loss_scaling_)
      s << "{\"scale\": " << number_str(scaler_.scale) << ", \"good_steps\": " << scaler_.good_steps << ", \"skipped_steps\": " << scaler_.skipped_steps << "}";
    else
      s << "null";
    s << "\n}\n";
    write_text_file(tmp / kStateFile, s.str());
    write_text_file(tmp / kMetaFile, meta_json);
    // 5. into place: the old checkpoint is replaced only once the new one is complete
    if (fs::exists(target)) {
      const fs::path old = sibling(target, "old");
      fs::rename(target, old);
      fs::rename(tmp, target);
      fs::remove_all(old);
    } else {
      fs::rename(tmp, target);
    }
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

CheckpointInfo SingleInsertTrainer::load_checkpoint(const std::string& dir) {
  std::lock_guard<std::mutex> self(mutex_);
  check_usable();
  const fs::path root(dir);
  const std::string text = read_text_file(root / kStateFile);
  JsonValue st;
  try {
    st = parse_json(text.data(), text.size());
    if (cfg_string(st, "format") != kCheckpointFormat || cfg_int(st, "version") != kCheckpointVersion)
      throw std::invalid_argument("not a version " + std::to_string(kCheckpointVersion) + " " + kCheckpointFormat);
  } catch (const std::exception& e) {
    throw std::invalid_argument((root / kStateFile).string() + ": " + e.what());
  }
  const std::string seed = cfg_string(st, "seed");
  if (seed != std::to_string(config_.seed))
    throw std::invalid_argument(dir + " was made with seed " + seed + " but this trainer has seed " + std::to_string(config_.seed));
  TrainerState loaded;
  loaded.stage = static_cast<int>(cfg_int(st, "stage"));
  std::vector<int64_t> done = cfg_int_list(st, "steps_done");
  if (done.size() != 2 || done[0] < 0 || done[1] < 0 || (loaded.stage != 1 && loaded.stage != 2))
    throw std::invalid_argument((root / kStateFile).string() + ": bad stage or steps_done");
  loaded.steps_done[0] = done[0];
  loaded.steps_done[1] = done[1];
  loaded.lora = cfg_has(st, "lora");
  if (loaded.lora) {
    const JsonValue& l = cfg_get(st, "lora");
    loaded.lora_rank = cfg_int(l, "rank");
    loaded.lora_alpha = cfg_double(l, "alpha");
  }
  if (loaded.lora != (loaded.stage == 2)) throw std::invalid_argument((root / kStateFile).string() + ": stage and lora disagree");
  DynamicLossScaler scaler;
  if (cfg_has(st, "loss_scale")) {
    const JsonValue& l = cfg_get(st, "loss_scale");
    scaler.scale = cfg_double(l, "scale");
    scaler.good_steps = cfg_int(l, "good_steps");
    scaler.skipped_steps = cfg_int(l, "skipped_steps");
  }

  Locks locks(*this);
  // 1. the stage: a stage-II checkpoint attaches the LoRA (its init is overwritten below) and starts
  //    the stage-II optimizer, as start_stage2 did in the original run
  if (loaded.lora) {
    if (state_.lora) {
      if (state_.lora_rank != loaded.lora_rank || state_.lora_alpha != loaded.lora_alpha)
        throw std::invalid_argument(dir + " has LoRA rank " + std::to_string(loaded.lora_rank) + " but this trainer's LoRA differs");
    } else {
      attach_lora(loaded.lora_rank, loaded.lora_alpha);
      optimizer_ = std::make_unique<AdamW>(trainable_parameters(), AdamWOptions{});
    }
  } else if (state_.lora) {
    throw std::invalid_argument(dir + " is a stage-I checkpoint but this trainer already started stage II");
  }

  torch::NoGradGuard no_grad;
  // 2. encoder
  if (!load_singleinsert_encoder(*encoder_, (root / kEncoderFile).string()))
    throw std::invalid_argument((root / kEncoderFile).string() + " has no head.weight / head.bias");
  // 3. LoRA values, strictly by kohya key
  if (loaded.lora) {
    auto file = SafetensorsFile::open((root / kLoraFile).string());
    std::set<std::string> used;
    for (auto& p : optimizer_->params()) {
      if (p.name.compare(0, std::char_traits<char>::length(kLoraParamPrefix), kLoraParamPrefix) != 0) continue;
      const std::string key = p.name.substr(std::char_traits<char>::length(kLoraParamPrefix));
      if (!file->contains(key)) throw std::invalid_argument(file->path() + " lacks " + key);
      at::Tensor value = file->load(key);
      if (value.sizes() != p.tensor.sizes())
        throw std::invalid_argument(file->path() + ": " + key + " is " + shape_str(value.sizes()) + ", expected " + shape_str(p.tensor.sizes()));
      p.tensor.detach().copy_(value);
      used.insert(key);
    }
    for (const auto& t : file->tensors()) {
      const bool alpha = t.name.size() > 6 && t.name.compare(t.name.size() - 6, 6, ".alpha") == 0;
      if (!alpha && !used.count(t.name)) throw std::invalid_argument(file->path() + " has an unexpected key " + t.name);
    }
  }
  // 4. AdamW state
  {
    auto file = SafetensorsFile::open((root / kOptimizerFile).string());
    auto stage_it = file->metadata().find("stage");
    if (stage_it == file->metadata().end() || stage_it->second != std::to_string(loaded.stage))
      throw std::invalid_argument(file->path() + ": the optimizer state is not for stage " + std::to_string(loaded.stage));
    std::set<std::string> used;
    for (auto& p : optimizer_->params()) {
      p.exp_avg = at::Tensor();
      p.exp_avg_sq = at::Tensor();
      p.step = 0;
      if (!file->contains(p.name + ".step")) continue;
      for (const char* part : {".exp_avg", ".exp_avg_sq"}) {
        const std::string key = p.name + part;
        if (!file->contains(key)) throw std::invalid_argument(file->path() + " lacks " + key);
        at::Tensor value = file->load(key);
        if (value.sizes() != p.tensor.sizes())
          throw std::invalid_argument(file->path() + ": " + key + " is " + shape_str(value.sizes()) + ", expected " + shape_str(p.tensor.sizes()));
        (std::string(part) == ".exp_avg" ? p.exp_avg : p.exp_avg_sq) = value.to(p.tensor.options()).contiguous();
        used.insert(key);
      }
      p.step = file->load(p.name + ".step").to(at::kLong).item<int64_t>();
      used.insert(p.name + ".step");
    }
    for (const auto& t : file->tensors())
      if (!used.count(t.name)) throw std::invalid_argument(file->path() + " has state for an unknown parameter: " + t.name);
  }
  state_ = loaded;
  if (loss_scaling_) scaler_ = scaler;
  CheckpointInfo info;
  info.state = state_;
  info.meta_json = fs::exists(root / kMetaFile) ? read_text_file(root / kMetaFile) : "{}";
  return info;
}

std::vector<std::string> SingleInsertTrainer::export_concept(const std::string& dir, const std::map<std::string, std::string>& metadata) {
  std::lock_guard<std::mutex> self(mutex_);
  check_usable();
  Locks locks(*this);
  torch::NoGradGuard no_grad;
  const fs::path root(dir);
  fs::create_directories(root);
  std::vector<std::string> written;
  // 1. the placeholder embedding as a textual-inversion file: one tensor `emb_params` [1, C]
  //    (A1111 and ComfyUI take a single-tensor safetensors; diffusers' load_textual_inversion reads emb_params)
  at::Tensor v = encoder_->embed(pixels_).to(at::kCPU).contiguous();
  write_safetensors((root / "embedding.safetensors").string(), {{"emb_params", v}}, metadata);
  written.push_back((root / "embedding.safetensors").string());
  // 2. the LoRA (kohya keys, UNet and text encoder in one file)
  if (state_.lora) {
    TensorMap lora = collect_lora(unet_->model->module(), kLoraUnetPrefix, kTrainerLoraName);
    for (auto& [k, t] : collect_lora(text_->model->module(), kLoraTextPrefix, kTrainerLoraName)) lora[k] = t;
    save_lora((root / "lora.safetensors").string(), lora, metadata);
    written.push_back((root / "lora.safetensors").string());
  }
  // 3. the encoder (vision_model.*, visual_projection.weight, head.*)
  std::vector<std::pair<std::string, at::Tensor>> encoder;
  for (const auto& p : encoder_->named_parameters(true)) encoder.emplace_back(p.key(), p.value());
  write_safetensors((root / "encoder.safetensors").string(), cpu_copies(encoder), metadata);
  written.push_back((root / "encoder.safetensors").string());
  return written;
}

size_t SingleInsertTrainer::dispose() {
  std::lock_guard<std::mutex> self(mutex_);
  if (disposed_) return 0;
  size_t n = 0;
  {
    Locks locks(*this);
    n += remove_lora(unet_->model->module(), kTrainerLoraName);
    n += remove_lora(text_->model->module(), kTrainerLoraName);
  }
  disposed_ = true;
  optimizer_.reset();
  encoder_ = nullptr;
  state_.lora = false;
  return n;
}

// ---------------------------------------------------------------- golden loss case

TensorMap singleinsert_loss_case(const std::shared_ptr<LoadedModel>& unet_model, const std::shared_ptr<LoadedModel>& vae_model,
                                 const std::shared_ptr<LoadedModel>& text_model, const LossCaseInputs& in) {
  check_models(*unet_model, *vae_model, *text_model);
  std::scoped_lock<std::mutex, std::mutex, std::mutex> lock(unet_model->mutex, vae_model->mutex, text_model->mutex);
  UNet2DConditionModelImpl& unet = unet_of(*unet_model);
  AutoencoderKLImpl& vae = vae_of(*vae_model);
  ClipTextModelImpl& text = text_of(*text_model);
  freeze(unet);
  freeze(vae);
  freeze(text);
  CheckpointingScope checkpointing(unet, in.grad_checkpointing);
  const at::TensorOptions opts = at::TensorOptions().dtype(at::kFloat).device(unet_model->opts.device());
  // every model computes in its own dtype; what enters is cast to it, what leaves is float32 (as the trainer does)
  const at::ScalarType unet_t = unet_model->opts.dtype().toScalarType(), vae_t = vae_model->opts.dtype().toScalarType(),
                       text_t = text_model->opts.dtype().toScalarType();
  auto unet_f32 = [&](const at::Tensor& x, const at::Tensor& t, const at::Tensor& ctx) { return unet.forward(x.to(unet_t), t, ctx.to(unet_t)).to(at::kFloat); };
  const at::Tensor alphas_cumprod = schedule_from_json(in.schedule_config).alphas_cumprod.to(opts.device());
  TensorMap out;

  // 1. x0 = vae.encode(image).latent_dist.mean · scaling_factor, repeated over the batch
  const at::Tensor t = in.timesteps.to(opts.device());
  const int64_t B = t.size(0);
  at::Tensor x0;
  {
    torch::NoGradGuard no_grad;
    x0 = vae.encode(in.image.to(opts.device(), vae_t)).mean.to(at::kFloat) * vae.scaling_factor;
  }
  x0 = x0.expand({B, x0.size(1), x0.size(2), x0.size(3)}).contiguous();
  // 2. the mask at latent size (nearest), one per element
  at::Tensor m = in.mask.dim() == 2 ? latent_mask_nearest(in.mask, x0.size(2), x0.size(3)) : in.mask.to(at::kFloat);
  m = m.to(opts).expand({B, 1, x0.size(2), x0.size(3)}).contiguous();
  // 3. x_t
  const at::Tensor noise = in.noise.to(opts);
  const at::Tensor ab = alphas_cumprod.index_select(0, t);
  const at::Tensor x_t = add_noise(alphas_cumprod, x0, noise, t);
  // 4. e* with v at every `*`, and the class prompt (no grad)
  const at::Tensor ids_star = in.ids_star.to(opts.device()), ids_class = in.ids_class.to(opts.device());
  const at::Tensor v = in.v.to(opts).detach().requires_grad_(true);
  const at::Tensor replace_index = at::nonzero(ids_star == in.star_token_id);  // [P, 2] rows (batch, position)
  const at::Tensor e_star = text.forward(ids_star, replace_index, v.to(text_t)).last_hidden_state.to(at::kFloat);
  at::Tensor e_class, eps_class, x_class;
  const at::Tensor eps_star = unet_f32(x_t, t, e_star);
  const at::Tensor x_star = predict_x0(x_t, eps_star, ab);
  {
    torch::NoGradGuard no_grad;
    e_class = text.forward(ids_class).last_hidden_state.to(at::kFloat);
    eps_class = unet_f32(x_t, t, e_class);
    x_class = predict_x0(x_t, eps_class, ab);
  }
  // 5. stage-I losses and their gradients w.r.t. v
  const at::Tensor L_fg = loss_fg(x_star, x0, m);
  const at::Tensor L_fg_masknorm = loss_fg_masknorm(x_star, x0, m);
  const at::Tensor L_bg = loss_bg(x_star, x_class, m);
  const at::Tensor L = L_fg + kDefaultGamma * L_bg;
  auto grad_v = [&](const at::Tensor& loss, bool retain) { return torch::autograd::grad({loss}, {v}, {}, retain)[0]; };
  out["dL_dv"] = grad_v(L, true);
  out["dL_fg_dv"] = grad_v(L_fg, true);
  out["dL_bg_dv"] = grad_v(L_bg, true);
  out["dL_fg_masknorm_dv"] = grad_v(L_fg_masknorm, false);
  out["L_fg"] = L_fg.detach();
  out["L_fg_masknorm"] = L_fg_masknorm.detach();
  out["L_bg"] = L_bg.detach();
  out["L"] = L.detach();

  // 6. stage II: the "open" UNet = UNet + the LoRA at scale 1; L_sm's gradients w.r.t. one layer's kohya tensors
  std::string layer_name;
  for (const auto& key : in.lora_keys) {
    const size_t dot = key.find('.');
    const std::string base = key.substr(0, dot);
    if (!layer_name.empty() && base != layer_name) throw std::invalid_argument("loss case: lora_target_keys must name one layer, got " + layer_name + " and " + base);
    layer_name = base;
  }
  if (layer_name.empty()) throw std::invalid_argument("loss case: lora_target_keys is empty");
  const std::string case_lora = "singleinsert_loss_case";
  TensorMap lora_tensors;
  {
    auto file = SafetensorsFile::open(in.lora_path);
    for (const auto& info : file->tensors()) lora_tensors[info.name] = file->load(info.name);
  }
  apply_lora(unet, kLoraUnetPrefix, lora_tensors, 1.0, /*strict=*/true, case_lora);
  try {
    std::shared_ptr<LoraAdapter> adapter;
    for (const auto& [name, a] : named_adapters(unet, kLoraUnetPrefix, case_lora))
      if (name == layer_name) adapter = a;
    if (!adapter) throw std::invalid_argument("loss case: " + in.lora_path + " has no UNet layer " + layer_name);
    // float32 leaves, as the trainer's adapters are (the same tensors when the UNet is float32)
    adapter->down = adapter->down.detach().to(at::kFloat).requires_grad_(true);
    adapter->up = adapter->up.detach().to(at::kFloat).requires_grad_(true);
    const at::Tensor eps_open = unet_f32(x_t, t, e_class);
    const at::Tensor x_open = predict_x0(x_t, eps_open, ab);
    const at::Tensor L_sm = loss_sm(x_open, x_class);
    std::vector<at::Tensor> g = torch::autograd::grad({L_sm}, {adapter->down, adapter->up});
    out["L_sm"] = L_sm.detach();
    for (const auto& key : in.lora_keys) {
      if (key == layer_name + ".lora_down.weight") out["dL_sm_dlora_down"] = g[0];
      else if (key == layer_name + ".lora_up.weight") out["dL_sm_dlora_up"] = g[1];
      else throw std::invalid_argument("loss case: " + key + " is not a lora_down.weight or lora_up.weight key");
    }
    out["intermediate.eps_open_class"] = eps_open.detach();
    out["intermediate.x0_pred_class_open"] = x_open.detach();
  } catch (...) {
    remove_lora(unet, case_lora);
    throw;
  }
  remove_lora(unet, case_lora);

  out["intermediate.x0"] = x0;
  out["intermediate.mask_latent"] = m;
  out["intermediate.alphas_cumprod_t"] = ab;
  out["intermediate.x_t"] = x_t;
  out["intermediate.text_emb_star"] = e_star.detach();
  out["intermediate.text_emb_class"] = e_class;
  out["intermediate.eps_star"] = eps_star.detach();
  out["intermediate.eps_class"] = eps_class;
  out["intermediate.x0_pred_star"] = x_star.detach();
  out["intermediate.x0_pred_class_fixed"] = x_class;
  return out;
}

}  // namespace si
