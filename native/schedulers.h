// The diffusers 0.25.1 noise schedulers SD v1.5 samples with, as plain C++ (no modules, no global
// state): DDIM, PNDM (PLMS steps only), Euler (discrete) and DPM-Solver++(2M), plus the DDPM
// training tables (betas, alphas_cumprod, add_noise).
//
// Each scheduler follows its reference file in diffusers/src/diffusers/schedulers/:
// scheduling_ddim.py, scheduling_pndm.py, scheduling_euler_discrete.py,
// scheduling_dpmsolver_multistep.py, scheduling_ddpm.py. The tables are float32, the per-step
// coefficients are float32 scalars combined in the reference's operation order, so a float32
// trajectory matches the reference to the last bits rather than to a tolerance.
//
// Configs arrive RESOLVED for one scheduler by lib/schedulers.ts (resolveSchedulerConfig): every
// key the scheduler reads is present, unsupported values were refused there (they are checked
// again here, with the key in the message).
//
// Use: a FRESH scheduler per generation call (PNDM's eps history and DPM-Solver's model outputs
// are per-call state), then
//   x = noise * init_noise_sigma()
//   for i in 0 .. num_model_calls()-1:
//     inp = scale_model_input(x, i)
//     eps = model(inp, timestep_tensor(i))          // with CFG: model on [uncond, cond], then guidance
//     x = step(eps, i, x, generator)                 // i must run 0, 1, 2, ... in order
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "json.h"

namespace si {

// ---------------------------------------------------------------- config and training tables

// The keys every scheduler reads (the betas and the timestep grid).
struct BetaScheduleConfig {
  int64_t num_train_timesteps = 1000;
  double beta_start = 0.0001;
  double beta_end = 0.02;
  std::string beta_schedule = "linear";     // "linear" | "scaled_linear"
  std::string timestep_spacing = "leading";  // "leading" | "linspace"
  int64_t steps_offset = 0;

  static BetaScheduleConfig from_json(const JsonValue& cfg);
};

// betas [N] and alphas_cumprod [N], float32 on the CPU, computed with the same torch ops as the
// reference (`torch.linspace(..., dtype=float32)`, squared for "scaled_linear", then
// `cumprod(1 - betas)` in float32).
struct NoiseSchedule {
  at::Tensor betas;
  at::Tensor alphas_cumprod;
  std::vector<float> alphas_cumprod_values;  // the same numbers, for scalar use

  static NoiseSchedule from_config(const BetaScheduleConfig& cfg);
};

// DDPMScheduler.add_noise (scheduling_ddpm.py): sqrt(ab[t])·x0 + sqrt(1 − ab[t])·noise, with
// ab = alphas_cumprod cast to x0's dtype and device first, as the reference does.
// x0, noise: [B, ...]; timesteps: int64 [B], each in [0, N).
at::Tensor add_noise(const at::Tensor& alphas_cumprod, const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps);

// ---------------------------------------------------------------- samplers

struct SchedulerOptions {
  // DDIM's eta (DDIM paper eq. 16: sigma_t = eta · sqrt((1−a_prev)/(1−a_t)) · sqrt(1 − a_t/a_prev)).
  // 0 is the deterministic DDIM; other schedulers refuse a nonzero eta.
  double eta = 0.0;
};

class Scheduler {
 public:
  virtual ~Scheduler() = default;

  // canonical name: "ddim" | "pndm" | "euler" | "dpmpp-2m" | "ddpm"
  const std::string& name() const { return name_; }
  int64_t num_inference_steps() const { return num_inference_steps_; }
  // The timesteps the model is called at, in order. PNDM calls the model once more than the
  // number of inference steps (it repeats its second timestep), so loops must run over these.
  const std::vector<double>& timesteps() const { return timesteps_; }
  size_t num_model_calls() const { return timesteps_.size(); }
  // Euler and DPM-Solver: sigma per model call plus the final one (size num_model_calls()+1).
  // Empty for the others.
  const std::vector<float>& sigmas() const { return sigmas_; }
  // The initial latents are noise · init_noise_sigma (1 except for Euler).
  float init_noise_sigma() const { return init_noise_sigma_; }
  const NoiseSchedule& schedule() const { return schedule_; }

  // The timestep as the UNet receives it: a 0-dim int64 tensor, float32 for Euler (its
  // timesteps can be fractional, e.g. 957.375 at 25 steps).
  at::Tensor timestep_tensor(size_t step_index) const;
  // All of them, [num_model_calls()] (int64, or float32 for Euler).
  at::Tensor timesteps_tensor() const;

  // The model input for step i (Euler divides by sqrt(sigma² + 1); the others return x).
  virtual at::Tensor scale_model_input(const at::Tensor& x, size_t step_index) const { return x; }

  // One step from x_t to x_{t-1}. model_output is the (guided) noise prediction for
  // scale_model_input(x, step_index). Steps must be taken in order 0, 1, 2, ...
  // A stochastic step (DDIM with eta > 0) draws its noise with `generator`, which must then be
  // given (a per-call generator: the global one is never used).
  at::Tensor step(const at::Tensor& model_output, size_t step_index, const at::Tensor& sample, at::Generator* generator);
  // The same step with the noise given explicitly (shape of sample); for a deterministic step
  // it must be undefined. For tests and for reproducing another implementation's noise.
  at::Tensor step_with_noise(const at::Tensor& model_output, size_t step_index, const at::Tensor& sample, const at::Tensor& noise);
  // Whether step `step_index` consumes noise.
  virtual bool needs_noise(size_t step_index) const { return false; }

 protected:
  Scheduler(std::string name, const BetaScheduleConfig& cfg, int64_t num_inference_steps);
  // The step itself; `noise` is defined exactly when needs_noise(step_index).
  virtual at::Tensor step_impl(const at::Tensor& model_output, size_t step_index, const at::Tensor& sample, const at::Tensor& noise) = 0;
  float alphas_cumprod_at(int64_t t) const;

  std::string name_;
  BetaScheduleConfig cfg_;
  int64_t num_inference_steps_;
  NoiseSchedule schedule_;
  std::vector<double> timesteps_;
  std::vector<float> sigmas_;
  float init_noise_sigma_ = 1.0f;
  bool float_timesteps_ = false;

 private:
  size_t next_step_ = 0;
};

// name: "ddim" | "pndm" | "euler" | "dpmpp-2m" (alias "dpmsolver_multistep") | "ddpm" (training
// tables and timesteps only: its step() throws). config: resolved for that scheduler (its
// "scheduler" key must name it). num_inference_steps in [1, num_train_timesteps].
// Throws std::invalid_argument naming the bad name, key or value.
std::unique_ptr<Scheduler> make_scheduler(const std::string& name, const JsonValue& config, int64_t num_inference_steps,
                                          const SchedulerOptions& options = {});

// The canonical name for a scheduler name or alias; throws std::invalid_argument on others.
std::string canonical_scheduler_name(const std::string& name);

// ---------------------------------------------------------------- a sampling loop

// What the loop saw, when asked to record it: trajectory [n+1, ...] (start, then after each
// step), model_inputs / model_outputs [n, ...].
struct Trajectory {
  at::Tensor final_sample;
  at::Tensor trajectory, model_inputs, model_outputs;
};

// The diffusers denoising loop with a callback for the model:
//   x = x_T · init_noise_sigma; for each step: eps = denoise(scale_model_input(x, i), timestep_tensor(i), i);
//   x = step(eps, i, x).
// `noise_per_step`, when defined, is [num_model_calls(), ...] and replaces the generator's draws.
using DenoiseFn = std::function<at::Tensor(const at::Tensor& model_input, const at::Tensor& timestep, size_t step_index)>;
Trajectory run_sampling_loop(Scheduler& scheduler, const at::Tensor& x_T, const DenoiseFn& denoise, at::Generator* generator,
                             const at::Tensor& noise_per_step = at::Tensor(), bool record = false);

}  // namespace si
