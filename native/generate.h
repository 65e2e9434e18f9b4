// Text-to-image sampling: diffusers 0.25.1 StableDiffusionPipeline.__call__
// (src/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py) from step 5 ("prepare
// latent variables") to the end, on modules that are already loaded. Prompt encoding happens
// before, in TypeScript (tokenizer + text encoder), so this file starts from the embeddings.
//
// The two phases are separate functions because they run under different locks: the worker
// (generate.cc) holds the UNet's job mutex for denoise_latents() and the VAE's for
// decode_latents(); a training loop that already owns the UNet can call them directly.
//
// Random numbers (the convention, pinned by test/generate.test.ts):
//   the initial latents are at::randn({B, 4, H/8, W/8}) in float32 on a CPU generator made by
//   at::make_generator<at::CPUGeneratorImpl>(seed), then moved to the model's device. This is
//   bit for bit what `torch.randn(shape, generator=torch.Generator().manual_seed(seed))` gives,
//   i.e. diffusers with a CPU generator (the usual way to get device-independent seeds). On CUDA
//   the draw stays on that CPU generator and is moved, exactly like diffusers' randn_tensor does
//   for a CPU generator with a CUDA pipeline. DDIM with eta > 0 draws its variance noise from the
//   same generator, after the latents, as diffusers passes one generator to both.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "model.h"
#include "schedulers.h"

namespace si {

class UNet2DConditionModelImpl;
class AutoencoderKLImpl;

struct GenerateParams {
  // Text conditioning, float32 (any device): [B, 77, C]. negative_embeds is only read when
  // classifier-free guidance is on (guidance_scale > 1, diffusers' do_classifier_free_guidance).
  at::Tensor prompt_embeds;
  at::Tensor negative_embeds;
  double guidance_scale = 7.5;
  int64_t steps = 50;
  std::string scheduler = "pndm";
  std::string scheduler_config_json;  // resolved for `scheduler` by lib/schedulers.ts
  double eta = 0.0;                   // DDIM only
  int64_t height = 512, width = 512;
  // 2^(len(vae block_out_channels) - 1), diffusers' vae_scale_factor: latents are H/f x W/f
  int64_t vae_scale_factor = 8;
  // Given initial latents [B, 4, H/8, W/8] (multiplied by init_noise_sigma like diffusers does),
  // or undefined to draw them from `seed` (see the convention above).
  at::Tensor latents;
  uint64_t seed = 0;
  bool record = false;  // keep the per-step intermediates
  // [B] int64, one prompt position per image: record the cross-attention map of that text token
  // (attention.h AttentionRecorder) into DenoiseResult::attention_maps. Undefined: no recording.
  at::Tensor attention_token_index;
  // Decode with float32 VAE weights whatever the VAE's dtype (A1111's --no-half-vae); see decode_latents.
  bool vae_float32 = false;
};

// What the loop saw (record = true), float32:
//   timesteps [n] (int64, float32 for Euler), initial_latents [B,4,h,w] (after init_noise_sigma),
//   unet_inputs / unet_outputs [n, 2B or B, 4, h, w] (CFG batch order [negative, positive]),
//   noise_pred_guided [n, B, 4, h, w], latents_after_step [n, B, 4, h, w].
// n is the number of model calls (PNDM: steps + 1).
struct DenoiseResult {
  at::Tensor latents;  // final latents [B, 4, h, w], float32 on the UNet's device
  TensorMap intermediates;
  // with attention_token_index: [B, h, w] float32 on the CPU, the recorded token's cross-attention
  // summed over layers, heads averaged, and over every model call; of the positive (prompt) half
  // of the CFG batch
  at::Tensor attention_maps;
};

struct DecodeResult {
  at::Tensor images;       // [B, H, W, 3] float32 in [0, 1] on the CPU: clamp(x/2 + 0.5, 0, 1), NHWC
  at::Tensor decoded_raw;  // [B, 3, H, W] float32 = vae.decode(latents / scaling_factor), before the clamp
  std::vector<std::string> warnings;  // e.g. the fp16 decode overflowed and was redone in float32
};

// Called after every model call with (calls done, total calls); runs on the calling thread.
using StepCallback = std::function<void(size_t done, size_t total)>;

// Thrown by denoise_latents / decode_latents when `cancel` was set.
class GenerationCancelled : public std::runtime_error {
 public:
  GenerationCancelled() : std::runtime_error("cancelled") {}
};

// Steps 5-7 of the pipeline (prepare latents, denoising loop). The caller holds the UNet's lock
// and a NoGradGuard. `unet_opts` gives the device and dtype the UNet was loaded with: its inputs
// are cast to that dtype, while the latents and the scheduler stay float32 (for float32 models
// this is exactly diffusers; for fp16 it keeps the scheduler arithmetic in float32).
// `cancel` is checked before every model call.
DenoiseResult denoise_latents(UNet2DConditionModelImpl& unet, const at::TensorOptions& unet_opts, const GenerateParams& params,
                              const StepCallback& on_step = nullptr, const std::atomic<bool>* cancel = nullptr);

// Step 8 (decode): vae.decode(latents / scaling_factor), then diffusers' VaeImageProcessor
// postprocess for output_type "np". The caller holds the VAE's lock and a NoGradGuard.
// Precision: the decode runs in the VAE's dtype, except
//   - float32 = true: in float32 (the weights are cast for the call and back, exactly);
//   - an fp16 VAE whose output holds inf/NaN (SD v1.5's VAE is known to overflow in fp16, which is why
//     diffusers' SDXL pipelines upcast it): the decode is redone in float32 and a warning says so.
DecodeResult decode_latents(AutoencoderKLImpl& vae, const at::TensorOptions& vae_opts, const at::Tensor& latents, bool float32 = false);

// The warning decode_latents adds when it redid an fp16 decode in float32.
extern const char* const kVaeFloat32FallbackWarning;

}  // namespace si
