// Text-to-image generation (generate.h) and its JS bindings:
//   generate(unet, vae, options, onProgress?) -> { promise, cancel }
//     options: { promptEmbeds, negativeEmbeds?, guidance, steps, scheduler, schedulerConfig (JSON text,
//                resolved by lib/schedulers.ts), eta, height, width, latents?, seed, returnIntermediates,
//                recordAttention?: { tokenIndex: int64 [B] }, vaeFloat32? }
//     onProgress(step, total, elapsedSec) after every UNet call, always before the promise settles
//     promise -> { images [B,H,W,3] F32, latents [B,4,h,w] F32, warnings: string[], intermediates?,
//                  attention_maps? [B,h,w] F32 }
//     cancel() stops the job before its next UNet call; the promise then rejects with an Error
//     whose `cancelled` property is true (lib/generate.ts turns it into an AbortError).
//   seededRandn(shape, seed) -> tensor: the draw generation uses for its initial latents.
// lib/generate.ts validates every option first; the checks here only guard the native side.
#include "generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <napi.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "attention.h"
#include "bindings.h"
#include "js_tensor.h"
#include "model_handle.h"
#include "precision.h"
#include "unet.h"
#include "vae.h"

namespace si {

// ---------------------------------------------------------------- the pipeline

DenoiseResult denoise_latents(UNet2DConditionModelImpl& unet, const at::TensorOptions& unet_opts, const GenerateParams& params,
                              const StepCallback& on_step, const std::atomic<bool>* cancel) {
  const at::Device device = unet_opts.device();
  const at::ScalarType dtype = unet_opts.dtype().toScalarType();
  const int64_t f = params.vae_scale_factor;
  TORCH_CHECK(params.height > 0 && params.width > 0 && params.height % f == 0 && params.width % f == 0,
              "height and width must be positive multiples of ", f, ", got ", params.height, "x", params.width);

  // 3. encode input prompt (done by the caller). diffusers' do_classifier_free_guidance is
  //    `guidance_scale > 1`: at 1 or below the negative prompt is not used at all.
  const bool do_cfg = params.guidance_scale > 1.0;
  TORCH_CHECK(params.prompt_embeds.defined() && params.prompt_embeds.dim() == 3, "prompt embeddings must be [B, 77, C], got ",
              params.prompt_embeds.defined() ? params.prompt_embeds.sizes() : at::IntArrayRef{});
  const int64_t B = params.prompt_embeds.size(0);
  at::Tensor context = params.prompt_embeds.to(device, dtype);  // [B, 77, C]
  if (do_cfg) {
    TORCH_CHECK(params.negative_embeds.defined() && params.negative_embeds.sizes() == params.prompt_embeds.sizes(),
                "negative prompt embeddings must have the prompt embeddings' shape ", params.prompt_embeds.sizes(), ", got ",
                params.negative_embeds.defined() ? params.negative_embeds.sizes() : at::IntArrayRef{});
    // the CFG batch is [negative, positive] (pipeline_stable_diffusion.py, step 3)
    context = at::cat({params.negative_embeds.to(device, dtype), context});  // [2B, 77, C]
  }

  // 4. prepare timesteps: a fresh scheduler per call (PNDM and DPM-Solver keep per-call history)
  SchedulerOptions sched_opts;
  sched_opts.eta = params.eta;
  const std::string& cfg_text = params.scheduler_config_json;
  std::unique_ptr<Scheduler> scheduler = make_scheduler(params.scheduler, parse_json(cfg_text.data(), cfg_text.size()), params.steps, sched_opts);

  // 5. prepare latent variables: given, or drawn on a per-job CPU generator (see generate.h)
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(params.seed);
  const std::vector<int64_t> shape = {B, unet.cfg.in_channels, params.height / f, params.width / f};
  at::Tensor latents;
  if (params.latents.defined()) {
    TORCH_CHECK(params.latents.sizes() == at::IntArrayRef(shape), "latents must be ", at::IntArrayRef(shape), " for ", B,
                " image(s) of ", params.height, "x", params.width, ", got ", params.latents.sizes());
    latents = params.latents.to(device, at::kFloat);
  } else {
    latents = at::randn(shape, generator, at::TensorOptions().dtype(at::kFloat)).to(device);
  }
  // "scale the initial noise by the standard deviation required by the scheduler" (given latents too)
  latents = latents * scheduler->init_noise_sigma();

  DenoiseResult result;
  // per-step records go to the CPU at once, so a long GPU run holds no copies on the device
  std::vector<at::Tensor> unet_inputs, unet_outputs, guided, after_step;
  if (params.record) {
    result.intermediates["timesteps"] = scheduler->timesteps_tensor();
    result.intermediates["initial_latents"] = latents.to(at::kCPU);
  }

  // cross-attention recording (evaluation masks): the token positions follow the CFG batch order
  std::unique_ptr<AttentionRecorder> recorder;
  if (params.attention_token_index.defined()) {
    at::Tensor index = params.attention_token_index.to(at::kCPU, at::kLong).flatten();
    TORCH_CHECK(index.size(0) == B, "attention token positions: expected one per image (", B, "), got ", index.size(0));
    recorder = std::make_unique<AttentionRecorder>(do_cfg ? at::cat({index, index}) : index, shape[2], shape[3]);
  }

  // 7. denoising loop, one iteration per model call (PNDM: steps + 1)
  const size_t n = scheduler->num_model_calls();
  for (size_t i = 0; i < n; ++i) {
    if (cancel != nullptr && cancel->load()) throw GenerationCancelled();
    // expand the latents for classifier-free guidance, then the scheduler's input scaling
    at::Tensor model_input = do_cfg ? at::cat({latents, latents}) : latents;  // [2B or B, 4, h, w]
    model_input = scheduler->scale_model_input(model_input, i);
    // predict the noise residual; latents and scheduler stay float32 whatever the UNet's dtype
    at::Tensor noise_pred = unet.forward(model_input.to(dtype), scheduler->timestep_tensor(i), context).to(at::kFloat);
    // perform guidance: noise = uncond + g * (text - uncond)
    at::Tensor noise;
    if (do_cfg) {
      std::vector<at::Tensor> halves = noise_pred.chunk(2);  // [negative, positive]
      noise = halves[0] + params.guidance_scale * (halves[1] - halves[0]);
    } else {
      noise = noise_pred;
    }
    // compute the previous noisy sample x_t -> x_t-1 (DDIM with eta > 0 draws from `generator`)
    latents = scheduler->step(noise, i, latents, &generator);
    if (params.record) {
      unet_inputs.push_back(model_input.to(at::kCPU));
      unet_outputs.push_back(noise_pred.to(at::kCPU));
      guided.push_back(noise.to(at::kCPU));
      after_step.push_back(latents.to(at::kCPU));
    }
    if (on_step) on_step(i + 1, n);
  }
  if (params.record) {
    result.intermediates["unet_inputs"] = at::stack(unet_inputs);
    result.intermediates["unet_outputs"] = at::stack(unet_outputs);
    result.intermediates["noise_pred_guided"] = at::stack(guided);
    result.intermediates["latents_after_step"] = at::stack(after_step);
  }
  if (recorder) {
    at::Tensor maps = recorder->maps();  // [2B or B, h, w]
    result.attention_maps = do_cfg ? maps.narrow(0, B, B).contiguous() : maps;
  }
  result.latents = latents;
  return result;
}

const char* const kVaeFloat32FallbackWarning =
    "The fp16 VAE decode produced inf/NaN values (SD v1.5's VAE overflows in fp16); the images were decoded again in fp32";

namespace {

// vae.decode(z) with float32 weights: the VAE is cast to float32 in place for the call and back to
// its dtype after it. Exact both ways (every fp16/bf16 value is a float32 value), and it needs the
// float32 copy of the weights only for the call; the caller's VAE lock keeps other jobs out meanwhile.
at::Tensor decode_float32(AutoencoderKLImpl& vae, at::ScalarType dtype, const at::Tensor& z) {
  vae.to(at::kFloat);
  at::Tensor decoded;
  try {
    decoded = vae.decode(z.to(at::kFloat));
  } catch (...) {
    vae.to(dtype);
    throw;
  }
  vae.to(dtype);
  return decoded;
}

}  // namespace

DecodeResult decode_latents(AutoencoderKLImpl& vae, const at::TensorOptions& vae_opts, const at::Tensor& latents, bool float32) {
  // latents: [B, 4, h, w] -> decoded: [B, 3, 8h, 8w]
  const at::ScalarType dtype = vae_opts.dtype().toScalarType();
  at::Tensor z = (latents.to(at::kFloat) / vae.scaling_factor).to(vae_opts.device(), float32 ? at::kFloat : dtype);
  DecodeResult out;
  at::Tensor decoded;
  if (float32 && dtype != at::kFloat) {
    decoded = decode_float32(vae, dtype, z);
  } else {
    decoded = with_precision_hint(vae_opts, [&] { return vae.decode(z); });
    if (dtype == at::kHalf && !at::isfinite(decoded).all().item<bool>()) {
      decoded = decode_float32(vae, dtype, z);
      out.warnings.push_back(kVaeFloat32FallbackWarning);
    }
  }
  out.decoded_raw = decoded.to(at::kCPU, at::kFloat);
  // VaeImageProcessor.postprocess(output_type="np"): denormalize, then NCHW -> NHWC float32
  out.images = (out.decoded_raw / 2 + 0.5).clamp(0, 1).permute({0, 2, 3, 1}).contiguous();
  return out;
}

// ---------------------------------------------------------------- bindings

namespace {

struct ProgressEvent {
  uint32_t step = 0, total = 0;
  double elapsed_sec = 0;
};

class GenerateWorker : public Napi::AsyncProgressQueueWorker<ProgressEvent> {
 public:
  GenerateWorker(Napi::Env env, std::shared_ptr<LoadedModel> unet, std::shared_ptr<LoadedModel> vae, GenerateParams params,
                 Napi::Function on_progress, std::shared_ptr<std::atomic<bool>> cancel)
      : Napi::AsyncProgressQueueWorker<ProgressEvent>(env, "singleinsert.generate"),
        deferred_(Napi::Promise::Deferred::New(env)),
        context_("generate(" + params.scheduler + ", " + std::to_string(params.steps) + " steps)"),
        unet_(std::move(unet)), vae_(std::move(vae)), params_(std::move(params)), cancel_(std::move(cancel)) {
    if (!on_progress.IsEmpty()) on_progress_ = Napi::Persistent(on_progress);
  }

  Napi::Promise Promise() { return deferred_.Promise(); }

 protected:
  void Execute(const ExecutionProgress& progress) override {
    try {
      torch::NoGradGuard no_grad;  // per thread: must be created here, on the worker
      auto& unet = dynamic_cast<UNet2DConditionModelImpl&>(unet_->model->module());
      auto& vae = dynamic_cast<AutoencoderKLImpl&>(vae_->model->module());
      params_.vae_scale_factor = int64_t{1} << (vae.config.block_out_channels.size() - 1);
      {
        std::lock_guard<std::mutex> lock(unet_->mutex);
        // the clock starts once the UNet is ours: time spent queued behind another job is not sampling speed
        const auto start = std::chrono::steady_clock::now();
        auto on_step = [&](size_t done, size_t total) {
          ProgressEvent e;
          e.step = static_cast<uint32_t>(done);
          e.total = static_cast<uint32_t>(total);
          e.elapsed_sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          progress.Send(&e, 1);
        };
        denoised_ = with_precision_hint(unet_->opts, [&] { return denoise_latents(unet, unet_->opts, params_, on_step, cancel_.get()); });
      }
      if (cancel_->load()) throw GenerationCancelled();
      std::lock_guard<std::mutex> lock(vae_->mutex);
      decoded_ = decode_latents(vae, vae_->opts, denoised_.latents, params_.vae_float32);
    } catch (const GenerationCancelled&) {
      cancelled_ = true;
      SetError(context_ + ": cancelled");
    } catch (const c10::Error& e) {
      SetError(context_ + ": " + e.what_without_backtrace());
    } catch (const std::exception& e) {
      SetError(context_ + ": " + e.what());
    } catch (...) {
      SetError(context_ + ": unknown native error");
    }
  }

  // On the main thread; node-addon-api drains every queued event before OnOK/OnError runs.
  void OnProgress(const ProgressEvent* events, size_t count) override {
    if (on_progress_.IsEmpty()) return;
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    for (size_t i = 0; i < count; ++i) {
      try {
        on_progress_.Call({Napi::Number::New(env, events[i].step), Napi::Number::New(env, events[i].total),
                           Napi::Number::New(env, events[i].elapsed_sec)});
      } catch (const Napi::Error&) {
        // the callback's own error is not the job's: lib/generate.ts catches user callbacks itself
      }
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    try {
      Napi::Object o = Napi::Object::New(env);
      o.Set("images", tensor_to_js(env, decoded_.images));
      o.Set("latents", tensor_to_js(env, denoised_.latents.to(at::kCPU, at::kFloat)));
      if (denoised_.attention_maps.defined()) o.Set("attention_maps", tensor_to_js(env, denoised_.attention_maps));
      Napi::Array warnings = Napi::Array::New(env, decoded_.warnings.size());
      for (size_t i = 0; i < decoded_.warnings.size(); ++i) warnings.Set(static_cast<uint32_t>(i), decoded_.warnings[i]);
      o.Set("warnings", warnings);
      if (params_.record) {
        Napi::Object inter = Napi::Object::New(env);
        for (const auto& [k, v] : denoised_.intermediates) inter.Set(k, tensor_to_js(env, v));
        inter.Set("decoded_raw", tensor_to_js(env, decoded_.decoded_raw));
        o.Set("intermediates", inter);
      }
      deferred_.Resolve(o);
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    } catch (const std::exception& e) {
      deferred_.Reject(Napi::Error::New(env, context_ + ": " + e.what()).Value());
    }
  }

  void OnError(const Napi::Error& e) override {
    Napi::Object err = e.Value();
    if (cancelled_) err.Set("cancelled", true);
    deferred_.Reject(err);
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::string context_;
  std::shared_ptr<LoadedModel> unet_, vae_;
  GenerateParams params_;
  std::shared_ptr<std::atomic<bool>> cancel_;
  Napi::FunctionReference on_progress_;
  DenoiseResult denoised_;
  DecodeResult decoded_;
  bool cancelled_ = false;
};

bool has(const Napi::Object& o, const char* key) { return o.Has(key) && !o.Get(key).IsUndefined(); }

double number_field(const Napi::Object& o, const char* key) {
  if (!o.Get(key).IsNumber()) throw Napi::TypeError::New(o.Env(), std::string("Expected a number for options.") + key);
  return o.Get(key).As<Napi::Number>().DoubleValue();
}

int64_t int_field(const Napi::Object& o, const char* key, double min) {
  double d = number_field(o, key);
  if (!(d >= min && d <= 9007199254740991.0 && d == std::floor(d)))
    throw Napi::TypeError::New(o.Env(), std::string("Expected an integer >= ") + std::to_string(static_cast<int64_t>(min)) + " for options." + key);
  return static_cast<int64_t>(d);
}

std::string string_field(const Napi::Object& o, const char* key) {
  if (!o.Get(key).IsString()) throw Napi::TypeError::New(o.Env(), std::string("Expected a string for options.") + key);
  return o.Get(key).As<Napi::String>().Utf8Value();
}

// generate(unet, vae, options, onProgress?) -> { promise, cancel }
Napi::Value Generate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[2].IsObject()) throw Napi::TypeError::New(env, "Expected generate(unet, vae, options, onProgress?)");
  std::shared_ptr<LoadedModel> unet = unwrap_model(info[0], "unet", "unet");
  std::shared_ptr<LoadedModel> vae = unwrap_model(info[1], "vae", "vae");
  Napi::Object o = info[2].As<Napi::Object>();
  GenerateParams p;
  p.prompt_embeds = tensor_from_js(o.Get("promptEmbeds"), "options.promptEmbeds");
  if (has(o, "negativeEmbeds")) p.negative_embeds = tensor_from_js(o.Get("negativeEmbeds"), "options.negativeEmbeds");
  p.guidance_scale = number_field(o, "guidance");
  p.steps = int_field(o, "steps", 1);
  p.scheduler = string_field(o, "scheduler");
  p.scheduler_config_json = string_field(o, "schedulerConfig");
  if (has(o, "eta")) p.eta = number_field(o, "eta");
  p.height = int_field(o, "height", 1);
  p.width = int_field(o, "width", 1);
  if (has(o, "latents")) p.latents = tensor_from_js(o.Get("latents"), "options.latents");
  if (has(o, "seed")) p.seed = static_cast<uint64_t>(int_field(o, "seed", 0));
  p.record = has(o, "returnIntermediates") && o.Get("returnIntermediates").ToBoolean().Value();
  if (has(o, "recordAttention")) {
    if (!o.Get("recordAttention").IsObject()) throw Napi::TypeError::New(env, "Expected an object { tokenIndex } for options.recordAttention");
    p.attention_token_index = tensor_from_js(o.Get("recordAttention").As<Napi::Object>().Get("tokenIndex"), "options.recordAttention.tokenIndex");
    if (p.attention_token_index.scalar_type() != at::kLong || p.attention_token_index.dim() != 1 || p.prompt_embeds.dim() < 1 ||
        p.attention_token_index.size(0) != p.prompt_embeds.size(0))
      throw Napi::TypeError::New(env, "Expected an int64 tensor [B] (one prompt position per image) for options.recordAttention.tokenIndex");
  }
  if (has(o, "vaeFloat32")) {
    if (!o.Get("vaeFloat32").IsBoolean()) throw Napi::TypeError::New(env, "Expected a boolean for options.vaeFloat32");
    p.vae_float32 = o.Get("vaeFloat32").As<Napi::Boolean>().Value();
  }
  if (!p.prompt_embeds.is_floating_point()) throw Napi::TypeError::New(env, "Expected floating-point options.promptEmbeds");
  Napi::Function on_progress;
  if (info.Length() > 3 && !info[3].IsUndefined() && !info[3].IsNull()) {
    if (!info[3].IsFunction()) throw Napi::TypeError::New(env, "Expected a function for onProgress");
    on_progress = info[3].As<Napi::Function>();
  }

  auto cancel = std::make_shared<std::atomic<bool>>(false);
  auto* worker = new GenerateWorker(env, std::move(unet), std::move(vae), std::move(p), on_progress, cancel);
  Napi::Object job = Napi::Object::New(env);
  job.Set("promise", worker->Promise());
  job.Set("cancel", Napi::Function::New(
                        env,
                        [cancel](const Napi::CallbackInfo& ci) -> Napi::Value {
                          cancel->store(true);
                          return ci.Env().Undefined();
                        },
                        "cancel"));
  worker->Queue();
  return job;
}

// seededRandn(shape, seed): at::randn(shape) in float32 on a CPU generator seeded with `seed`,
// the same numbers as torch.randn(shape, generator=torch.Generator().manual_seed(seed)).
Napi::Value SeededRandn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsArray() || !info[1].IsNumber()) throw Napi::TypeError::New(env, "Expected seededRandn(shape: number[], seed: number)");
  std::vector<int64_t> shape;
  Napi::Array a = info[0].As<Napi::Array>();
  for (uint32_t i = 0; i < a.Length(); ++i) {
    double d = a.Get(i).IsNumber() ? a.Get(i).As<Napi::Number>().DoubleValue() : -1;
    if (!(d >= 0 && d <= 1e9 && d == std::floor(d))) throw Napi::TypeError::New(env, "Expected non-negative integers in shape");
    shape.push_back(static_cast<int64_t>(d));
  }
  double seed = info[1].As<Napi::Number>().DoubleValue();
  if (!(seed >= 0 && seed <= 9007199254740991.0 && seed == std::floor(seed))) throw Napi::TypeError::New(env, "Expected a non-negative safe integer for seed");
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  return tensor_to_js(env, at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat)));
}

}  // namespace

void register_generate(Napi::Env env, Napi::Object exports) {
  exports.Set("generate", Napi::Function::New(env, Generate, "generate"));
  exports.Set("seededRandn", Napi::Function::New(env, SeededRandn, "seededRandn"));
}

}  // namespace si
