// SingleInsert training (Wu et al., 2023, arXiv:2310.08094): one image, its foreground mask and a
// class word ("face") give the embedding of a placeholder `*`, predicted by an image encoder, and in
// stage II a rank-r LoRA on the UNet and the text encoder.
//
//   Stage I  (SD frozen; trains the image encoder):             L = L_fg + γ·L_bg
//   Stage II (trains the encoder and LoRA on UNet + text):       L = L_fg + γ·L_bg + η·L_sm
// with the losses of losses.h on x0 predictions from the prompt "* class" (the `*` token embedding
// replaced by the encoder's output) and the class prompt "class".
//
// One step (SingleInsertTrainer::step), per batch of B elements, each with its own t and noise:
//   1. v = encoder(image pixels)                     [1, C]   (the same for every element)
//   2. e* = text_encoder("* class", `*` -> v)       [1, 77, C]; stage II also e_cls = text_encoder("class") with LoRA
//   3. per micro-batch: x_t = √ᾱ·x0 + √(1−ᾱ)·ε; x̂[* class] = x0-prediction of unet(x_t, t, e*)
//        stage I:  L_bg target x̂[class] from the frozen UNet, no grad
//        stage II: x̂_lora[class] (grad) is L_sm's input and, detached, L_bg's target;
//                  L_sm's target x̂_frozen[class] is the same UNet with its LoRA bypassed (LoraBypass), no grad
//      backward of (n/B)·L per micro-batch into the conditioning leaves, then once through steps 1–2
//   4. clip_grad_norm (1.0) over all trainable parameters, then one hand-written AdamW step
//
// Determinism: a step's t and noise come from a CPU generator seeded from (seed, stage, step), the
// encoder's random init and the LoRA's from (seed, purpose). A checkpoint holds everything else
// (encoder, LoRA, AdamW moments and step counts, counters), so a resumed run reproduces an
// uninterrupted one bit for bit on the CPU.
//
// Optimizer per stage: as the official two-stage recipe runs two separate trainings, stage II starts
// a NEW AdamW (fresh moments, step count 0) over the encoder and the LoRA; the encoder keeps its
// stage-I weights but not its stage-I AdamW state.
//
// Precision (precision.h): the frozen UNet, VAE and text encoder may be fp32, bf16 or fp16 (each as it
// was loaded); the encoder, the LoRA adapters (float32 even on bf16/fp16 layers), the AdamW state, x0,
// the noise, x_t and the losses are float32. Model inputs are cast to the model's dtype and outputs
// back to float32, so the placeholder vector reaches the text encoder through a cast that gradients
// flow through. fp16 models turn on dynamic loss scaling (DynamicLossScaler: scale 2^16, a step with
// inf/NaN gradients is skipped and the scale halved, ×2 after 2000 good steps); bf16 needs none.
// fp16 on the CPU is refused (libtorch's CPU kernels lack it; use bf16 there). An fp16 VAE encode of
// the training image that overflows is redone in fp32 (once, in init()).
//
// Host syncs: a step copies its losses and gradient norm to the host once, at its end (one transfer;
// reporting them every step costs nothing more, as the step must end there anyway). fp16 adds one
// for the inf/NaN check that decides whether the update is applied, fgNorm "mask" one per
// micro-batch (the empty-mask check in loss_fg_masknorm), and the text encoder's bounds check of the
// placeholder positions (clip.cc) four at the start of the step, while the device is idle.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "device_info.h"
#include "image_encoder.h"
#include "model.h"
#include "model_handle.h"
#include "precision.h"

namespace si {

// ---------------------------------------------------------------- AdamW

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

// torch.optim.AdamW (torch 1.13 `_single_tensor_adamw`, amsgrad=False, maximize=False), written out
// so that its state is plain tensors a checkpoint can hold. Per parameter with a gradient:
//   step += 1; p *= 1 − lr·wd; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²
//   p −= lr / (1 − β1^step) · m / (√v / √(1 − β2^step) + eps)
// (torch 2.x updates m with lerp_, the same value up to rounding.) Parameters without a gradient are
// skipped, as PyTorch does; their state is created at their first step.
class AdamW {
 public:
  struct Param {
    std::string name;  // checkpoint key
    at::Tensor tensor;
    at::Tensor exp_avg, exp_avg_sq;  // undefined until the first step
    int64_t step = 0;
  };
  AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions options);

  // Gradients to "none" (torch 2.x's zero_grad default; the same math as zeroing).
  void zero_grad();
  // The 2-norm over every gradient, as a 0-dim float32 tensor on the parameters' device (no host
  // sync); undefined when no parameter has a gradient.
  at::Tensor grad_norm();
  // torch.nn.utils.clip_grad_norm_(params, max_norm) (norm 2) given the total norm from grad_norm():
  // scales every gradient by min(1, max_norm / (total_norm + 1e-6)).
  void clip_grad(const at::Tensor& total_norm, double max_norm);
  // Multiplies every gradient by `factor` (loss-scaling: 1/scale).
  void scale_grads(double factor);
  // grad_norm + clip_grad; returns the total norm before clipping (one host sync).
  double clip_grad_norm(double max_norm);
  void step(double lr);

  std::vector<Param>& params() { return params_; }
  const AdamWOptions& options() const { return options_; }

 private:
  std::vector<Param> params_;
  AdamWOptions options_;
};

// ---------------------------------------------------------------- trainer

enum class FgNorm {
  Mean,  // L_fg = mean over all elements (the paper's form, the default)
  Mask,  // L_fg normalised by the mask area (loss_fg_masknorm)
};

struct TrainerInputs {
  at::Tensor image;           // [1, 3, R, R] in [-1, 1]
  at::Tensor mask_latent;     // [1, 1, R/8, R/8] in [0, 1] (nearest-resized, or soft)
  at::Tensor encoder_pixels;  // [1, 3, S, S], CLIP-normalised, S = the encoder's image_size
  at::Tensor ids_star;        // [1, 77] int64: "* class"
  at::Tensor ids_class;       // [1, 77] int64: "class"
  std::vector<int64_t> placeholder_positions;  // where `*` sits in ids_star (BOS is 0)
};

struct TrainerConfig {
  std::string encoder_config;   // resolved clip_vision config JSON plus "head_out" (text hidden size)
  std::string encoder_weights;  // pretrained CLIPVisionModelWithProjection safetensors; "" = random init
  std::string schedule_config;  // resolved "ddpm" scheduler config JSON (betas, num_train_timesteps)
  double gamma = 1.0, eta = 1.0;
  FgNorm fg_norm = FgNorm::Mean;
  uint64_t seed = 0;
  // Recompute the UNet's blocks in backward instead of keeping their activations (checkpoint.h):
  // the same losses and gradients for about one more UNet forward per backward.
  bool grad_checkpointing = false;
};

struct Losses {
  double fg = 0, bg = 0, sm = 0, total = 0;
};

struct StepOptions {
  int stage = 1;            // 1 or 2
  int64_t batch = 1;        // elements per step, each with its own t and noise
  int64_t micro_batch = 0;  // elements per forward/backward pass (gradient accumulation); 0 = batch
  double lr = 1e-4;         // constant learning rate of this step
  int64_t step = 0;         // index of this step within its stage: must equal steps_done(stage)
  // Optional fixed batch (int64 [B] and [B, 4, h, w]) instead of the (seed, stage, step) draw, e.g. to
  // overfit one batch in a test; `batch` is then ignored.
  at::Tensor timesteps, noise;
  // Also return every trainable parameter's gradient (unscaled, before clipping), for parity tests.
  bool return_gradients = false;
};

struct StepResult {
  Losses losses;
  double grad_norm = 0;    // before clipping (after unscaling, with loss scaling)
  bool skipped = false;    // fp16: the gradients held inf/NaN, so the update was not applied
  double loss_scale = 0;   // fp16: the scale this step's loss was multiplied by; 0 without loss scaling
  MemoryStats memory;      // after the step (CUDA peak since init(), or since the caller's reset)
  // with return_gradients: (checkpoint key, gradient on the CPU) of every parameter that got one
  std::vector<std::pair<std::string, at::Tensor>> gradients;
};

// The dtypes the trainer found, as "fp32" | "bf16" | "fp16".
struct PrecisionInfo {
  std::string unet, vae, text;
  bool loss_scaling = false;  // any fp16 model
};

struct TrainerState {
  int stage = 1;                    // the optimizer's stage (2 once start_stage2 ran)
  int64_t steps_done[2] = {0, 0};  // completed steps of stage I and stage II
  bool lora = false;
  int64_t lora_rank = 0;
  double lora_alpha = 0;
};

struct CheckpointInfo {
  TrainerState state;
  std::string meta_json;  // what the caller stored with save_checkpoint
};

// The name of the trainer's LoRA on the shared UNet and text encoder.
constexpr const char* kTrainerLoraName = "singleinsert";
// max_norm of torch.nn.utils.clip_grad_norm_ in the SingleInsert recipe.
constexpr double kMaxGradNorm = 1.0;

// Derives independent seeds for the trainer's random streams (splitmix64 of the seed and two words).
uint64_t derive_seed(uint64_t seed, uint64_t a, uint64_t b);

class SingleInsertTrainer {
 public:
  // Takes the shared models (fp32, bf16 or fp16, on one device, with no LoRA attached) and copies
  // the inputs; nothing is computed until init(). Every method takes the trainer's mutex, and the
  // ones that touch the models (all but embedding() and state()) also the three models' mutexes.
  SingleInsertTrainer(std::shared_ptr<LoadedModel> unet, std::shared_ptr<LoadedModel> vae, std::shared_ptr<LoadedModel> text,
                      TrainerInputs inputs, TrainerConfig config);
  ~SingleInsertTrainer();  // removes the LoRA from the shared models when dispose() was not called
  SingleInsertTrainer(const SingleInsertTrainer&) = delete;
  SingleInsertTrainer& operator=(const SingleInsertTrainer&) = delete;

  // Freezes the base models (requires_grad false), builds the encoder (random or pretrained),
  // computes x0 = vae.encode(image).mean · scaling_factor and the class-prompt encoding once, and
  // creates the stage-I optimizer.
  void init();
  StepResult step(const StepOptions& options);
  // Attaches rank-`rank` LoRA adapters (kohya init, seeded) to the UNet and the text encoder and
  // starts the stage-II optimizer over encoder + LoRA. Returns (adapters, LoRA parameters).
  std::pair<size_t, int64_t> start_stage2(int64_t rank, double alpha);
  // Losses of the current stage on a fixed batch (timesteps int64 [B], noise [B, 4, h, w]), no update.
  Losses evaluate(const at::Tensor& timesteps, const at::Tensor& noise, int64_t micro_batch = 0);
  // The current placeholder embedding [1, C] (CPU, float32).
  at::Tensor embedding();
  // Writes encoder, LoRA, AdamW state and counters (+ meta_json) into `dir`, atomically: a temp
  // folder next to it, renamed into place.
  void save_checkpoint(const std::string& dir, const std::string& meta_json);
  CheckpointInfo load_checkpoint(const std::string& dir);
  // embedding.safetensors (`emb_params` [1, C]), lora.safetensors (kohya, UNet + text encoder; only
  // after stage II started), encoder.safetensors; each file atomic. Returns the paths written.
  std::vector<std::string> export_concept(const std::string& dir, const std::map<std::string, std::string>& metadata);
  // Removes the LoRA from the shared models; later calls throw. Returns the adapters removed.
  size_t dispose();

  TrainerState state();
  PrecisionInfo precision() const;
  // The loss scaler's state (meaningful when precision().loss_scaling).
  DynamicLossScaler loss_scaler();
  int64_t hidden_size() const { return hidden_; }
  std::vector<int64_t> latent_shape() const;
  int64_t encoder_parameters();

 private:
  struct Locks;
  // Returns [fg, bg, sm, total] as float64 on the device (no host sync). With `train`, backpropagates
  // loss_scale × the loss.
  at::Tensor run_batch(int stage, const at::Tensor& timesteps, const at::Tensor& noise, int64_t micro_batch, bool train, double loss_scale);
  at::Tensor encode_star(const at::Tensor& v);
  at::Tensor unet_forward(const at::Tensor& x, const at::Tensor& t, const at::Tensor& context);
  std::vector<std::pair<std::string, at::Tensor>> trainable_parameters();
  std::pair<size_t, int64_t> attach_lora(int64_t rank, double alpha);
  void check_usable() const;
  void check_batch(const at::Tensor& timesteps, const at::Tensor& noise, const char* what) const;

  std::mutex mutex_;
  std::shared_ptr<LoadedModel> unet_, vae_, text_;
  TrainerInputs inputs_;
  TrainerConfig config_;
  at::TensorOptions opts_;  // float32 on the models' device: everything the trainer owns
  at::ScalarType unet_dtype_ = at::kFloat, vae_dtype_ = at::kFloat, text_dtype_ = at::kFloat;
  bool loss_scaling_ = false;
  DynamicLossScaler scaler_;
  bool initialized_ = false, disposed_ = false;

  SingleInsertEncoder encoder_{nullptr};
  std::unique_ptr<AdamW> optimizer_;
  TrainerState state_;
  int64_t hidden_ = 0;
  at::Tensor alphas_cumprod_;  // [N] float32 on the device
  at::Tensor x0_;              // [1, 4, h, w]
  at::Tensor mask_;            // [1, 1, h, w]
  at::Tensor pixels_;          // [1, 3, S, S]
  at::Tensor ids_star_, ids_class_, replace_index_;
  at::Tensor e_class_frozen_;  // [1, 77, C]: the class prompt without LoRA
};

// ---------------------------------------------------------------- golden loss case

// The computation of fixtures/cases/singleinsert_losses (see the fixtures README): every loss and
// gradient of one fixed batch, with the UNet/VAE/text encoder frozen (requires_grad set false on the
// shared models, as the trainer does), the `*` embedding `v` a leaf, and L_sm's gradients w.r.t. one
// kohya LoRA layer of `lora_path`, attached to the UNet at scale 1 for the call and removed after it.
struct LossCaseInputs {
  at::Tensor image;        // [1, 3, H, W] in [-1, 1]
  at::Tensor mask;         // [H, W] full resolution (resized nearest) or [1, 1, h, w] latent mask
  at::Tensor timesteps;    // int64 [B]
  at::Tensor noise;        // [B, 4, h, w]
  at::Tensor ids_star;     // int64 [B, 77]; `*` at every position where id == star_token_id
  at::Tensor ids_class;    // int64 [B, 77]
  at::Tensor v;            // [C]
  int64_t star_token_id = 265;
  std::string schedule_config;   // resolved "ddpm" config JSON
  std::string lora_path;         // kohya LoRA file
  std::vector<std::string> lora_keys;  // `<layer>.lora_down.weight` and/or `<layer>.lora_up.weight` of one UNet layer
  bool grad_checkpointing = false;     // run the UNet's blocks through checkpoint_block (same results)
};

// The models may be fp32, bf16 or fp16 (cast as the trainer does; the LoRA layer's adapter is made
// float32 so its gradients are). Outputs under the case's names: L_fg, L_fg_masknorm, L_bg, L, dL_dv, dL_fg_dv, dL_fg_masknorm_dv,
// dL_bg_dv, L_sm, dL_sm_dlora_down, dL_sm_dlora_up, and intermediates (x0, mask_latent,
// alphas_cumprod_t, x_t, text_emb_star, text_emb_class, eps_star, eps_class, x0_pred_star,
// x0_pred_class_fixed, eps_open_class, x0_pred_class_open).
TensorMap singleinsert_loss_case(const std::shared_ptr<LoadedModel>& unet, const std::shared_ptr<LoadedModel>& vae,
                                 const std::shared_ptr<LoadedModel>& text, const LossCaseInputs& inputs);

}  // namespace si
