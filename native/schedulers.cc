// Ports of the diffusers 0.25.1 schedulers (see schedulers.h). Each class cites its reference
// file; comments quote the reference expression where the operation order matters.
//
// Precision: the reference keeps its tables (betas, alphas_cumprod, sigmas) as float32 tensors
// and indexes them into 0-dim float32 tensors, so every per-step coefficient is a float32 value
// computed in float32 arithmetic. The coefficients below are therefore `float` and combined in
// the reference's order; the tensor ops (mul/sub/div by a scalar) are the same ATen kernels.
// Timestep grids come from numpy in float64 (linspace, round, interp) and are recomputed the same
// way in double.
#include "schedulers.h"

#include <cmath>
#include <deque>
#include <stdexcept>

#include "model.h"

namespace si {

namespace {

// ---------------------------------------------------------------- config checks

std::string require_one_of(const JsonValue& cfg, const std::string& key, const std::vector<std::string>& allowed) {
  std::string v = cfg_string(cfg, key);
  for (const auto& a : allowed)
    if (v == a) return v;
  std::string expected;
  for (size_t i = 0; i < allowed.size(); ++i) expected += (i ? " or \"" : "\"") + allowed[i] + "\"";
  throw std::invalid_argument("config key \"" + key + "\" is \"" + v + "\", expected " + expected + " (other values are not supported)");
}

void require_bool(const JsonValue& cfg, const std::string& key, bool expected) {
  if (cfg_bool(cfg, key) != expected)
    throw std::invalid_argument("config key \"" + key + "\" is " + (expected ? "false" : "true") + ", expected " +
                                (expected ? "true" : "false") + " (the other value is not supported)");
}

void require_null(const JsonValue& cfg, const std::string& key) {
  const JsonValue& v = cfg_get(cfg, key);
  if (v.kind != JsonValue::Null) throw std::invalid_argument("config key \"" + key + "\" is set, expected null (other values are not supported)");
}

// ---------------------------------------------------------------- numpy, in double

// np.linspace(start, stop, num): start + i·((stop − start)/(num − 1)), the last set to stop.
std::vector<double> np_linspace(double start, double stop, int64_t num) {
  std::vector<double> y(static_cast<size_t>(num));
  if (num == 1) {
    y[0] = start;
    return y;
  }
  const double step = (stop - start) / static_cast<double>(num - 1);
  for (int64_t i = 0; i < num; ++i) y[i] = static_cast<double>(i) * step + start;
  y[num - 1] = stop;
  return y;
}

// np.round: half to even (the default FE_TONEAREST rounding of nearbyint).
double np_round(double x) { return std::nearbyint(x); }

// np.interp(x, arange(len(fp)), fp) as numpy's compiled_interp computes it.
double np_interp_arange(double x, const std::vector<float>& fp) {
  const int64_t n = static_cast<int64_t>(fp.size());
  if (x <= 0) return fp[0];
  if (x >= static_cast<double>(n - 1)) return fp[n - 1];
  const int64_t j = static_cast<int64_t>(std::floor(x));
  if (static_cast<double>(j) == x) return fp[j];
  // slope = (fp[j+1] - fp[j]) / (xp[j+1] - xp[j]), and xp[j+1] - xp[j] = 1 here
  const double slope = static_cast<double>(fp[j + 1]) - static_cast<double>(fp[j]);
  return slope * (x - static_cast<double>(j)) + static_cast<double>(fp[j]);
}

// The sigma table of the Karras-style schedulers: ((1 − ab) / ab) ** 0.5 in float32 torch ops
// (scheduling_euler_discrete.py / scheduling_dpmsolver_multistep.py set_timesteps).
std::vector<float> sigma_table(const at::Tensor& alphas_cumprod) {
  at::Tensor s = ((1.0 - alphas_cumprod) / alphas_cumprod).pow(0.5).contiguous();
  return std::vector<float>(s.data_ptr<float>(), s.data_ptr<float>() + s.numel());
}

// torch evaluates log and exp of a 0-dim float32 tensor with its vectorised kernels (Sleef or
// MKL), which may differ from libm's logf/expf in the last bit; take them from the same kernels.
float torch_log(float x) { return at::log(at::scalar_tensor(x, at::TensorOptions().dtype(at::kFloat))).item<float>(); }
float torch_exp(float x) { return at::exp(at::scalar_tensor(x, at::TensorOptions().dtype(at::kFloat))).item<float>(); }

// _sigma_to_alpha_sigma_t (scheduling_dpmsolver_multistep.py): alpha_t = 1 / (sigma² + 1) ** 0.5,
// sigma_t = sigma · alpha_t, in float32.
struct AlphaSigma {
  float alpha, sigma;
};
AlphaSigma alpha_sigma_from_sigma(float sigma) {
  const float alpha = 1.0f / std::sqrt(sigma * sigma + 1.0f);
  return {alpha, sigma * alpha};
}

// ---------------------------------------------------------------- DDIM (scheduling_ddim.py)

class DDIMScheduler : public Scheduler {
 public:
  DDIMScheduler(const BetaScheduleConfig& cfg, int64_t n, bool set_alpha_to_one, double eta)
      : Scheduler("ddim", cfg, n), eta_(eta) {
    // __init__: "the final step has no previous alphas_cumprod; use 1 or alphas_cumprod[0]"
    final_alpha_cumprod_ = set_alpha_to_one ? 1.0f : schedule_.alphas_cumprod_values[0];
    // set_timesteps
    const int64_t N = cfg.num_train_timesteps;
    if (cfg.timestep_spacing == "linspace") {
      // np.linspace(0, N - 1, n).round()[::-1] (no steps_offset)
      std::vector<double> ts = np_linspace(0, static_cast<double>(N - 1), n);
      for (auto it = ts.rbegin(); it != ts.rend(); ++it) timesteps_.push_back(np_round(*it));
    } else {  // "leading": (arange(n) * (N // n)).round()[::-1] + steps_offset
      const int64_t ratio = N / n;
      for (int64_t i = n - 1; i >= 0; --i) timesteps_.push_back(static_cast<double>(i * ratio + cfg.steps_offset));
    }
  }

  bool needs_noise(size_t) const override { return eta_ > 0; }

 protected:
  at::Tensor step_impl(const at::Tensor& model_output, size_t i, const at::Tensor& sample, const at::Tensor& noise) override {
    // 1. previous step: prev_timestep = timestep - N // num_inference_steps
    const int64_t t = static_cast<int64_t>(timesteps_[i]);
    const int64_t prev_t = t - cfg_.num_train_timesteps / num_inference_steps_;
    // 2. alphas and betas
    const float alpha_prod_t = alphas_cumprod_at(t);
    const float alpha_prod_t_prev = prev_t >= 0 ? alphas_cumprod_at(prev_t) : final_alpha_cumprod_;
    const float beta_prod_t = 1.0f - alpha_prod_t;
    // 3. "predicted x_0" of DDIM eq. 12: (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
    at::Tensor pred_original_sample = (sample - model_output * std::sqrt(beta_prod_t)) / std::sqrt(alpha_prod_t);
    const at::Tensor& pred_epsilon = model_output;
    // 4. (clipping / thresholding of x_0: refused by the config)
    // 5. sigma_t of eq. 16: eta * sqrt(_get_variance)
    const float beta_prod_t_prev = 1.0f - alpha_prod_t_prev;
    const float variance = (beta_prod_t_prev / beta_prod_t) * (1.0f - alpha_prod_t / alpha_prod_t_prev);
    const float std_dev_t = static_cast<float>(eta_) * std::sqrt(variance);
    // 6. "direction pointing to x_t": (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
    at::Tensor pred_sample_direction = pred_epsilon * std::sqrt(1.0f - alpha_prod_t_prev - std_dev_t * std_dev_t);
    // 7. x_{t-1} without the random noise
    at::Tensor prev_sample = pred_original_sample * std::sqrt(alpha_prod_t_prev) + pred_sample_direction;
    if (eta_ > 0) prev_sample = prev_sample + noise * std_dev_t;  // "variance = std_dev_t * variance_noise"
    return prev_sample;
  }

 private:
  double eta_;
  float final_alpha_cumprod_ = 1.0f;
};

// ---------------------------------------------------------------- PNDM (scheduling_pndm.py)

// Only the PLMS part (skip_prk_steps=True, as SD v1.5 ships it): a linear multistep method on
// the eps history whose first step is a two-model-call pseudo-Heun step (the repeated timestep).
class PNDMScheduler : public Scheduler {
 public:
  PNDMScheduler(const BetaScheduleConfig& cfg, int64_t n, bool set_alpha_to_one) : Scheduler("pndm", cfg, n) {
    final_alpha_cumprod_ = set_alpha_to_one ? 1.0f : schedule_.alphas_cumprod_values[0];
    // set_timesteps: _timesteps ascending
    const int64_t N = cfg.num_train_timesteps;
    std::vector<double> base;
    if (cfg.timestep_spacing == "linspace") {
      for (double v : np_linspace(0, static_cast<double>(N - 1), n)) base.push_back(np_round(v));
    } else {  // "leading"
      const int64_t ratio = N / n;
      for (int64_t i = 0; i < n; ++i) base.push_back(static_cast<double>(i * ratio + cfg.steps_offset));
    }
    // plms_timesteps = concatenate([_timesteps[:-1], _timesteps[-2:-1], _timesteps[-1:]])[::-1]
    std::vector<double> plms(base.begin(), base.end() - 1);
    if (base.size() >= 2) plms.push_back(base[base.size() - 2]);
    plms.push_back(base.back());
    timesteps_.assign(plms.rbegin(), plms.rend());
  }

 protected:
  // step_plms
  at::Tensor step_impl(const at::Tensor& model_output, size_t i, const at::Tensor& sample_in, const at::Tensor&) override {
    const int64_t ratio = cfg_.num_train_timesteps / num_inference_steps_;
    int64_t timestep = static_cast<int64_t>(timesteps_[i]);
    int64_t prev_timestep = timestep - ratio;
    if (counter_ != 1) {
      while (ets_.size() > 3) ets_.pop_front();  // self.ets = self.ets[-3:]
      ets_.push_back(model_output);
    } else {
      // the second call at the repeated timestep completes the first step from the same t
      prev_timestep = timestep;
      timestep = timestep + ratio;
    }

    at::Tensor eps = model_output, sample = sample_in;
    const size_t k = ets_.size();
    if (k == 1 && counter_ == 0) {
      cur_sample_ = sample;
    } else if (k == 1 && counter_ == 1) {
      eps = (model_output + ets_[0]) / 2;
      sample = cur_sample_;
      cur_sample_ = at::Tensor();
    } else if (k == 2) {
      eps = (ets_[1] * 3 - ets_[0]) / 2;
    } else if (k == 3) {
      eps = (ets_[2] * 23 - ets_[1] * 16 + ets_[0] * 5) / 12;
    } else {
      // (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
      eps = (ets_[3] * 55 - ets_[2] * 59 + ets_[1] * 37 - ets_[0] * 9) * (1.0 / 24);
    }
    at::Tensor prev_sample = prev_sample_from(sample, timestep, prev_timestep, eps);
    ++counter_;
    return prev_sample;
  }

 private:
  // _get_prev_sample: formula (9) of the PNDM paper, x_{t−δ} = sample_coeff·x_t − (α_{t−δ} − α_t)·eps / denom
  at::Tensor prev_sample_from(const at::Tensor& sample, int64_t timestep, int64_t prev_timestep, const at::Tensor& eps) const {
    const float alpha_prod_t = alphas_cumprod_at(timestep);
    const float alpha_prod_t_prev = prev_timestep >= 0 ? alphas_cumprod_at(prev_timestep) : final_alpha_cumprod_;
    const float beta_prod_t = 1.0f - alpha_prod_t;
    const float beta_prod_t_prev = 1.0f - alpha_prod_t_prev;
    const float sample_coeff = std::sqrt(alpha_prod_t_prev / alpha_prod_t);
    const float denom = alpha_prod_t * std::sqrt(beta_prod_t_prev) + std::sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev);
    // sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff
    return sample * sample_coeff - (eps * (alpha_prod_t_prev - alpha_prod_t)) / denom;
  }

  float final_alpha_cumprod_ = 1.0f;
  int64_t counter_ = 0;
  std::deque<at::Tensor> ets_;  // the last (up to 4) raw model outputs, oldest first
  at::Tensor cur_sample_;
};

// ---------------------------------------------------------------- Euler (scheduling_euler_discrete.py)

// Karras et al. 2022 Algorithm 2 without churn (s_churn = 0, so gamma = 0 and no noise).
class EulerDiscreteScheduler : public Scheduler {
 public:
  EulerDiscreteScheduler(const BetaScheduleConfig& cfg, int64_t n) : Scheduler("euler", cfg, n) {
    float_timesteps_ = true;
    // set_timesteps: the grid in float32
    const int64_t N = cfg.num_train_timesteps;
    std::vector<float> ts;
    if (cfg.timestep_spacing == "linspace") {
      // np.linspace(0, N - 1, n, dtype=np.float32)[::-1]
      std::vector<double> lin = np_linspace(0, static_cast<double>(N - 1), n);
      for (auto it = lin.rbegin(); it != lin.rend(); ++it) ts.push_back(static_cast<float>(*it));
    } else {  // "leading": (arange(n) * (N // n)).round()[::-1].astype(float32) + steps_offset
      const int64_t ratio = N / n;
      for (int64_t i = n - 1; i >= 0; --i) ts.push_back(static_cast<float>(i * ratio) + static_cast<float>(cfg.steps_offset));
    }
    // sigmas = np.interp(timesteps, arange(N), ((1 - ab) / ab) ** 0.5), then [..., 0.0] in float32
    const std::vector<float> table = sigma_table(schedule_.alphas_cumprod);
    for (float t : ts) {
      timesteps_.push_back(t);
      sigmas_.push_back(static_cast<float>(np_interp_arange(t, table)));
    }
    sigmas_.push_back(0.0f);
    // init_noise_sigma: max(sigmas) for "linspace"/"trailing", else (max² + 1) ** 0.5
    float max_sigma = 0.0f;
    for (float s : sigmas_) max_sigma = std::max(max_sigma, s);
    init_noise_sigma_ = cfg.timestep_spacing == "linspace" ? max_sigma : std::sqrt(max_sigma * max_sigma + 1.0f);
  }

  // sample / ((sigma**2 + 1) ** 0.5): the input of the eps-model at noise level sigma
  at::Tensor scale_model_input(const at::Tensor& x, size_t i) const override {
    TORCH_CHECK(i < timesteps_.size(), "scale_model_input: step ", i, " of a ", timesteps_.size(), "-step schedule");
    const float sigma = sigmas_[i];
    return x / std::sqrt(sigma * sigma + 1.0f);
  }

 protected:
  at::Tensor step_impl(const at::Tensor& model_output, size_t i, const at::Tensor& sample_in, const at::Tensor&) override {
    // "Upcast to avoid precision issues when computing prev_sample"
    at::Tensor sample = sample_in.to(at::kFloat);
    const float sigma = sigmas_[i];
    const float sigma_hat = sigma;  // sigma * (gamma + 1) with gamma = 0 (s_churn = 0)
    // 1. x_0 from the sigma-scaled predicted noise
    at::Tensor pred_original_sample = sample - model_output * sigma_hat;
    // 2. the ODE derivative dx/dsigma and one Euler step to the next sigma
    at::Tensor derivative = (sample - pred_original_sample) / sigma_hat;
    const float dt = sigmas_[i + 1] - sigma_hat;
    at::Tensor prev_sample = sample + derivative * dt;
    return prev_sample.to(model_output.scalar_type());
  }
};

// ---------------------------------------------------------------- DPM-Solver++ (scheduling_dpmsolver_multistep.py)

// Multistep DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) with the data-prediction model,
// "midpoint" second-order update: "DPM++ 2M".
class DPMSolverMultistepScheduler : public Scheduler {
 public:
  DPMSolverMultistepScheduler(const BetaScheduleConfig& cfg, int64_t n, int64_t solver_order, bool lower_order_final, bool euler_at_final)
      : Scheduler("dpmpp-2m", cfg, n), solver_order_(solver_order), lower_order_final_(lower_order_final), euler_at_final_(euler_at_final),
        model_outputs_(static_cast<size_t>(solver_order)) {
    // set_timesteps (lambda_min_clipped = -inf, so last_timestep = N)
    const int64_t last_timestep = cfg.num_train_timesteps;
    if (cfg.timestep_spacing == "linspace") {
      // np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1]
      std::vector<double> lin = np_linspace(0, static_cast<double>(last_timestep - 1), n + 1);
      for (int64_t i = n; i >= 1; --i) timesteps_.push_back(np_round(lin[i]));
    } else {  // "leading": (arange(n + 1) * (last // (n + 1))).round()[::-1][:-1] + steps_offset
      const int64_t ratio = last_timestep / (n + 1);
      for (int64_t i = n; i >= 1; --i) timesteps_.push_back(static_cast<double>(i * ratio + cfg.steps_offset));
    }
    // sigmas = interp(timesteps) + [sigma at t = 0] (diffusers 0.25.1 has no final_sigmas_type:
    // the last step goes to sigma(0), not to 0)
    const std::vector<float> table = sigma_table(schedule_.alphas_cumprod);
    for (double t : timesteps_) sigmas_.push_back(static_cast<float>(np_interp_arange(t, table)));
    sigmas_.push_back(table[0]);
  }

 protected:
  at::Tensor step_impl(const at::Tensor& model_output, size_t i, const at::Tensor& sample, const at::Tensor&) override {
    const size_t n = timesteps_.size();
    // "Improve numerical stability for small number of steps"
    const bool lower_order_final = (i == n - 1) && (euler_at_final_ || (lower_order_final_ && n < 15));

    // convert_model_output: eps -> x0 prediction, (sample - sigma_t * eps) / alpha_t
    const AlphaSigma s = alpha_sigma_from_sigma(sigmas_[i]);
    at::Tensor x0_pred = (sample - model_output * s.sigma) / s.alpha;
    for (size_t k = 0; k + 1 < model_outputs_.size(); ++k) model_outputs_[k] = model_outputs_[k + 1];
    model_outputs_.back() = x0_pred;

    at::Tensor prev_sample;
    if (solver_order_ == 1 || lower_order_nums_ < 1 || lower_order_final) {
      prev_sample = first_order_update(x0_pred, i, sample);
    } else {
      // the reference's `lower_order_second` only steps a third-order solver down to second order
      prev_sample = second_order_update(i, sample);
    }
    if (lower_order_nums_ < solver_order_) ++lower_order_nums_;
    return prev_sample;
  }

 private:
  // dpm_solver_first_order_update (DPM-Solver++ eq. 5 with k = 1, i.e. DDIM):
  // x_t = (sigma_t / sigma_s) * x - alpha_t * (exp(-h) - 1) * x0
  at::Tensor first_order_update(const at::Tensor& x0_pred, size_t i, const at::Tensor& sample) const {
    const AlphaSigma t = alpha_sigma_from_sigma(sigmas_[i + 1]);
    const AlphaSigma s = alpha_sigma_from_sigma(sigmas_[i]);
    const float lambda_t = torch_log(t.alpha) - torch_log(t.sigma);
    const float lambda_s = torch_log(s.alpha) - torch_log(s.sigma);
    const float h = lambda_t - lambda_s;
    const float c = t.alpha * (torch_exp(-h) - 1.0f);
    return sample * (t.sigma / s.sigma) - x0_pred * c;
  }

  // multistep_dpm_solver_second_order_update, solver_type "midpoint" (DPM-Solver++(2M), Alg. 2):
  // D0 = m0, D1 = (m0 - m1) / r0, x_t = (sigma_t/sigma_s0)·x − c·D0 − 0.5·c·D1, c = alpha_t·(exp(−h) − 1)
  at::Tensor second_order_update(size_t i, const at::Tensor& sample) const {
    const AlphaSigma t = alpha_sigma_from_sigma(sigmas_[i + 1]);
    const AlphaSigma s0 = alpha_sigma_from_sigma(sigmas_[i]);
    const AlphaSigma s1 = alpha_sigma_from_sigma(sigmas_[i - 1]);
    const float lambda_t = torch_log(t.alpha) - torch_log(t.sigma);
    const float lambda_s0 = torch_log(s0.alpha) - torch_log(s0.sigma);
    const float lambda_s1 = torch_log(s1.alpha) - torch_log(s1.sigma);
    const at::Tensor& m0 = model_outputs_[model_outputs_.size() - 1];
    const at::Tensor& m1 = model_outputs_[model_outputs_.size() - 2];
    const float h = lambda_t - lambda_s0;
    const float h_0 = lambda_s0 - lambda_s1;
    const float r0 = h_0 / h;
    const at::Tensor& D0 = m0;
    at::Tensor D1 = (m0 - m1) * (1.0f / r0);
    const float c = t.alpha * (torch_exp(-h) - 1.0f);
    return sample * (t.sigma / s0.sigma) - D0 * c - D1 * (0.5f * c);
  }

  int64_t solver_order_;
  bool lower_order_final_, euler_at_final_;
  std::vector<at::Tensor> model_outputs_;  // x0 predictions, newest last
  int64_t lower_order_nums_ = 0;
};

// ---------------------------------------------------------------- DDPM (scheduling_ddpm.py)

// The training tables and timestep grid only; sampling with DDPM is not supported (training uses its tables).
class DDPMScheduler : public Scheduler {
 public:
  DDPMScheduler(const BetaScheduleConfig& cfg, int64_t n) : Scheduler("ddpm", cfg, n) {
    const int64_t N = cfg.num_train_timesteps;
    if (cfg.timestep_spacing == "linspace") {
      std::vector<double> ts = np_linspace(0, static_cast<double>(N - 1), n);
      for (auto it = ts.rbegin(); it != ts.rend(); ++it) timesteps_.push_back(np_round(*it));
    } else {
      const int64_t ratio = N / n;
      for (int64_t i = n - 1; i >= 0; --i) timesteps_.push_back(static_cast<double>(i * ratio + cfg.steps_offset));
    }
  }

 protected:
  at::Tensor step_impl(const at::Tensor&, size_t, const at::Tensor&, const at::Tensor&) override {
    throw std::invalid_argument("the ddpm scheduler provides the training tables (add_noise) only; sample with ddim, pndm, euler or dpmpp-2m");
  }
};

}  // namespace

// ---------------------------------------------------------------- tables

BetaScheduleConfig BetaScheduleConfig::from_json(const JsonValue& cfg) {
  BetaScheduleConfig c;
  c.num_train_timesteps = cfg_int(cfg, "num_train_timesteps");
  if (c.num_train_timesteps < 2) throw std::invalid_argument("config key \"num_train_timesteps\" is " + std::to_string(c.num_train_timesteps) + ", expected an integer >= 2");
  c.beta_start = cfg_double(cfg, "beta_start");
  c.beta_end = cfg_double(cfg, "beta_end");
  if (!(c.beta_start > 0 && c.beta_end > 0 && c.beta_start < 1 && c.beta_end < 1))
    throw std::invalid_argument("config keys \"beta_start\" and \"beta_end\" must lie in (0, 1)");
  c.beta_schedule = require_one_of(cfg, "beta_schedule", {"scaled_linear", "linear"});
  require_null(cfg, "trained_betas");
  require_one_of(cfg, "prediction_type", {"epsilon"});
  c.timestep_spacing = require_one_of(cfg, "timestep_spacing", {"leading", "linspace"});
  c.steps_offset = cfg_int(cfg, "steps_offset");
  if (c.steps_offset < 0) throw std::invalid_argument("config key \"steps_offset\" is " + std::to_string(c.steps_offset) + ", expected a non-negative integer");
  return c;
}

NoiseSchedule NoiseSchedule::from_config(const BetaScheduleConfig& cfg) {
  NoiseSchedule s;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  if (cfg.beta_schedule == "scaled_linear") {
    // "this schedule is very specific to the latent diffusion model":
    // torch.linspace(beta_start**0.5, beta_end**0.5, N, dtype=torch.float32) ** 2
    s.betas = at::linspace(std::sqrt(cfg.beta_start), std::sqrt(cfg.beta_end), cfg.num_train_timesteps, f32).pow(2);
  } else {
    s.betas = at::linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, f32);
  }
  s.alphas_cumprod = at::cumprod(1.0 - s.betas, 0).contiguous();
  const float* p = s.alphas_cumprod.data_ptr<float>();
  s.alphas_cumprod_values.assign(p, p + s.alphas_cumprod.numel());
  return s;
}

at::Tensor add_noise(const at::Tensor& alphas_cumprod, const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps) {
  TORCH_CHECK(x0.sizes() == noise.sizes(), "add_noise: x0 ", x0.sizes(), " and noise ", noise.sizes(), " differ in shape");
  TORCH_CHECK(x0.dim() >= 1 && timesteps.dim() == 1 && timesteps.size(0) == x0.size(0),
              "add_noise: expected one timestep per batch item, got timesteps ", timesteps.sizes(), " for x0 ", x0.sizes());
  TORCH_CHECK(timesteps.scalar_type() == at::kLong, "add_noise: timesteps must be int64, got ", timesteps.scalar_type());
  const at::Tensor t = timesteps.to(at::kCPU).contiguous();
  const int64_t N = alphas_cumprod.size(0);
  for (int64_t i = 0; i < t.numel(); ++i) {
    const int64_t v = t.data_ptr<int64_t>()[i];
    TORCH_CHECK(v >= 0 && v < N, "add_noise: timesteps must lie in [0, ", N, "), got ", v, " at index ", i);
  }
  // alphas_cumprod.to(device=x0.device, dtype=x0.dtype), then gathered at the timesteps
  at::Tensor ab = alphas_cumprod.to(x0.device(), x0.scalar_type()).index_select(0, timesteps.to(x0.device()));
  std::vector<int64_t> shape(static_cast<size_t>(x0.dim()), 1);
  shape[0] = x0.size(0);
  at::Tensor sqrt_alpha_prod = ab.pow(0.5).reshape(shape);
  at::Tensor sqrt_one_minus_alpha_prod = (1 - ab).pow(0.5).reshape(shape);
  return sqrt_alpha_prod * x0 + sqrt_one_minus_alpha_prod * noise;
}

// ---------------------------------------------------------------- Scheduler

Scheduler::Scheduler(std::string name, const BetaScheduleConfig& cfg, int64_t num_inference_steps)
    : name_(std::move(name)), cfg_(cfg), num_inference_steps_(num_inference_steps) {
  if (num_inference_steps < 1 || num_inference_steps > cfg.num_train_timesteps)
    throw std::invalid_argument(name_ + ": num_inference_steps is " + std::to_string(num_inference_steps) + ", expected an integer between 1 and " +
                                std::to_string(cfg.num_train_timesteps) + " (num_train_timesteps)");
  schedule_ = NoiseSchedule::from_config(cfg);
}

float Scheduler::alphas_cumprod_at(int64_t t) const {
  const auto& v = schedule_.alphas_cumprod_values;
  if (t < 0 || t >= static_cast<int64_t>(v.size()))
    throw std::invalid_argument(name_ + ": timestep " + std::to_string(t) + " is outside the " + std::to_string(v.size()) +
                                "-step training schedule (steps_offset too large for this number of steps?)");
  return v[static_cast<size_t>(t)];
}

at::Tensor Scheduler::timestep_tensor(size_t i) const {
  TORCH_CHECK(i < timesteps_.size(), name_, ": step ", i, " of a ", timesteps_.size(), "-call schedule");
  if (float_timesteps_) return at::scalar_tensor(static_cast<float>(timesteps_[i]), at::TensorOptions().dtype(at::kFloat));
  return at::scalar_tensor(static_cast<int64_t>(timesteps_[i]), at::TensorOptions().dtype(at::kLong));
}

at::Tensor Scheduler::timesteps_tensor() const {
  if (float_timesteps_) {
    std::vector<float> v(timesteps_.begin(), timesteps_.end());
    return at::tensor(v, at::TensorOptions().dtype(at::kFloat));
  }
  std::vector<int64_t> v;
  for (double t : timesteps_) v.push_back(static_cast<int64_t>(t));
  return at::tensor(v, at::TensorOptions().dtype(at::kLong));
}

at::Tensor Scheduler::step(const at::Tensor& model_output, size_t i, const at::Tensor& sample, at::Generator* generator) {
  at::Tensor noise;
  if (needs_noise(i)) {
    if (generator == nullptr)
      throw std::invalid_argument(name_ + ": this step draws noise and needs a generator (the global generator is never used)");
    // diffusers' randn_tensor: drawn on the generator's device, then moved
    noise = at::randn(sample.sizes(), *generator, model_output.options().device(generator->device())).to(sample.device());
  }
  return step_with_noise(model_output, i, sample, noise);
}

at::Tensor Scheduler::step_with_noise(const at::Tensor& model_output, size_t i, const at::Tensor& sample, const at::Tensor& noise) {
  if (i != next_step_)
    throw std::invalid_argument(name_ + ": step " + std::to_string(i) + " called, expected step " + std::to_string(next_step_) +
                                " (steps run once each, in order; use a fresh scheduler per generation)");
  if (i >= timesteps_.size())
    throw std::invalid_argument(name_ + ": step " + std::to_string(i) + " of a " + std::to_string(timesteps_.size()) + "-call schedule");
  TORCH_CHECK(model_output.sizes() == sample.sizes(), name_, ": model_output ", model_output.sizes(), " and sample ", sample.sizes(), " differ in shape");
  if (needs_noise(i)) {
    TORCH_CHECK(noise.defined() && noise.sizes() == sample.sizes(), name_, ": step ", i, " needs noise of shape ", sample.sizes());
  } else {
    TORCH_CHECK(!noise.defined(), name_, ": step ", i, " is deterministic and takes no noise");
  }
  at::Tensor out = step_impl(model_output, i, sample, noise);
  ++next_step_;
  return out;
}

std::string canonical_scheduler_name(const std::string& name) {
  if (name == "ddim" || name == "pndm" || name == "euler" || name == "dpmpp-2m" || name == "ddpm") return name;
  if (name == "dpmsolver_multistep") return "dpmpp-2m";
  throw std::invalid_argument("unknown scheduler \"" + name + "\" (expected ddim, pndm, euler, dpmpp-2m or ddpm)");
}

namespace {

std::unique_ptr<Scheduler> construct_scheduler(const std::string& name, const JsonValue& config, int64_t n, const SchedulerOptions& options) {
  const std::string canon = canonical_scheduler_name(name);
  // class-dependent defaults (timestep_spacing, set_alpha_to_one, ...) were filled for one scheduler
  const std::string resolved_for = canonical_scheduler_name(cfg_string(config, "scheduler"));
  if (resolved_for != canon)
    throw std::invalid_argument("the config was resolved for " + resolved_for + ", not for " + canon +
                                " (resolve the raw config with resolveSchedulerConfig(raw, source, \"" + canon + "\"))");
  if (!(options.eta >= 0 && options.eta <= 1)) throw std::invalid_argument("eta is " + std::to_string(options.eta) + ", expected a number between 0 and 1");
  if (options.eta != 0 && canon != "ddim") throw std::invalid_argument("eta applies to the ddim scheduler only, not to " + canon);

  const BetaScheduleConfig cfg = BetaScheduleConfig::from_json(config);
  if (canon == "ddim") {
    require_bool(config, "clip_sample", false);
    require_bool(config, "thresholding", false);
    require_bool(config, "rescale_betas_zero_snr", false);
    return std::make_unique<DDIMScheduler>(cfg, n, cfg_bool(config, "set_alpha_to_one"), options.eta);
  }
  if (canon == "pndm") {
    require_bool(config, "skip_prk_steps", true);
    return std::make_unique<PNDMScheduler>(cfg, n, cfg_bool(config, "set_alpha_to_one"));
  }
  if (canon == "euler") {
    require_one_of(config, "interpolation_type", {"linear"});
    require_bool(config, "use_karras_sigmas", false);
    require_one_of(config, "timestep_type", {"discrete"});
    require_bool(config, "rescale_betas_zero_snr", false);
    return std::make_unique<EulerDiscreteScheduler>(cfg, n);
  }
  if (canon == "dpmpp-2m") {
    const int64_t order = cfg_int(config, "solver_order");
    if (order != 1 && order != 2) throw std::invalid_argument("config key \"solver_order\" is " + std::to_string(order) + ", expected 1 or 2 (higher orders are not supported)");
    require_one_of(config, "algorithm_type", {"dpmsolver++"});
    require_one_of(config, "solver_type", {"midpoint"});
    require_bool(config, "thresholding", false);
    require_bool(config, "use_karras_sigmas", false);
    require_bool(config, "use_lu_lambdas", false);
    require_null(config, "variance_type");
    return std::make_unique<DPMSolverMultistepScheduler>(cfg, n, order, cfg_bool(config, "lower_order_final"), cfg_bool(config, "euler_at_final"));
  }
  require_bool(config, "rescale_betas_zero_snr", false);
  return std::make_unique<DDPMScheduler>(cfg, n);
}

}  // namespace

std::unique_ptr<Scheduler> make_scheduler(const std::string& name, const JsonValue& config, int64_t n, const SchedulerOptions& options) {
  std::unique_ptr<Scheduler> s = construct_scheduler(name, config, n, options);
  // DDIM and PNDM index alphas_cumprod with their timesteps; "leading" + steps_offset can run
  // past the table (1000 steps, offset 1). diffusers fails there only after the first model call;
  // fail before it. (Euler and DPM-Solver interpolate sigmas, clamped at the ends like np.interp.)
  if (s->name() == "ddim" || s->name() == "pndm") {
    const int64_t N = s->schedule().alphas_cumprod.size(0);
    for (double t : s->timesteps())
      if (t < 0 || t > static_cast<double>(N - 1))
        throw std::invalid_argument(s->name() + ": timestep " + std::to_string(static_cast<int64_t>(t)) + " is outside the " + std::to_string(N) +
                                    "-step training schedule (steps_offset " + std::to_string(cfg_int(config, "steps_offset")) + " with " +
                                    std::to_string(n) + " steps)");
  }
  return s;
}

// ---------------------------------------------------------------- sampling loop

Trajectory run_sampling_loop(Scheduler& scheduler, const at::Tensor& x_T, const DenoiseFn& denoise, at::Generator* generator,
                             const at::Tensor& noise_per_step, bool record) {
  const size_t n = scheduler.num_model_calls();
  if (noise_per_step.defined())
    TORCH_CHECK(noise_per_step.dim() == x_T.dim() + 1 && noise_per_step.size(0) == static_cast<int64_t>(n) &&
                    noise_per_step.sizes().slice(1) == x_T.sizes(),
                "noise per step must be [", n, ", ", x_T.sizes(), "], got ", noise_per_step.sizes());
  Trajectory out;
  std::vector<at::Tensor> trajectory, inputs, outputs;
  // "scale the initial noise by the standard deviation required by the scheduler"
  at::Tensor x = x_T * scheduler.init_noise_sigma();
  if (record) trajectory.push_back(x);
  for (size_t i = 0; i < n; ++i) {
    at::Tensor model_input = scheduler.scale_model_input(x, i);
    at::Tensor eps = denoise(model_input, scheduler.timestep_tensor(i), i);
    if (record) {
      inputs.push_back(model_input);
      outputs.push_back(eps);
    }
    if (noise_per_step.defined())
      x = scheduler.step_with_noise(eps, i, x, scheduler.needs_noise(i) ? noise_per_step[static_cast<int64_t>(i)] : at::Tensor());
    else
      x = scheduler.step(eps, i, x, generator);
    if (record) trajectory.push_back(x);
  }
  out.final_sample = x;
  if (record) {
    out.trajectory = at::stack(trajectory);
    out.model_inputs = at::stack(inputs);
    out.model_outputs = at::stack(outputs);
  }
  return out;
}

}  // namespace si
