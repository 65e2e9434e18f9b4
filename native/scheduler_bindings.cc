// JS bindings for the schedulers (the math is in schedulers.cc; these only convert):
//   schedulerInfo(name, configJson, steps) -> { name, timesteps, timestepDtype, sigmas?, initNoiseSigma,
//                                               numModelCalls, betas, alphasCumprod }
//   schedulerTrajectory(name, configJson, steps, noise, options?) -> Promise<{ timesteps, trajectory,
//       model_inputs, model_outputs }> with the golden fixtures' fake model eps = 0.1·inp + 0.05·sin(t/100);
//       options: { eta?: number, seed?: number, varianceNoise?: Tensor [numModelCalls, ...noise.shape] }
//   ddpmAddNoise(configJson, x0, noise, timesteps) -> Promise<Tensor>
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <napi.h>

#include <cmath>
#include <string>

#include "bindings.h"
#include "js_tensor.h"
#include "schedulers.h"
#include "worker.h"

namespace si {

namespace {

// The fake model of the scheduler fixtures: eps = 0.1 * inp + 0.05 * sin(t / 100), t as a float.
// The golden model outputs are reproduced bit for bit when sin(t / 100) is taken in double,
// rounded to float32 and multiplied by 0.05 in float32 (a float32 tensor holding math.sin).
at::Tensor fixture_fake_model(const at::Tensor& model_input, const at::Tensor& timestep, size_t) {
  const float s = static_cast<float>(std::sin(timestep.item<double>() / 100.0));
  return model_input * 0.1 + 0.05f * s;
}

std::string string_arg(const Napi::CallbackInfo& info, size_t i, const char* what) {
  if (info.Length() <= i || !info[i].IsString()) throw Napi::TypeError::New(info.Env(), std::string("Expected a string for ") + what);
  return info[i].As<Napi::String>().Utf8Value();
}

int64_t steps_arg(const Napi::CallbackInfo& info, size_t i) {
  if (info.Length() <= i || !info[i].IsNumber()) throw Napi::TypeError::New(info.Env(), "Expected a positive integer for steps");
  double d = info[i].As<Napi::Number>().DoubleValue();
  if (!(d >= 1 && d <= 1e9 && d == std::floor(d))) throw Napi::TypeError::New(info.Env(), "Expected a positive integer for steps but received " + std::to_string(d));
  return static_cast<int64_t>(d);
}

JsonValue parse_config(const std::string& json) { return parse_json(json.data(), json.size()); }

Napi::Float64Array to_f64(Napi::Env env, const std::vector<double>& v) {
  Napi::Float64Array a = Napi::Float64Array::New(env, v.size());
  for (size_t i = 0; i < v.size(); ++i) a[i] = v[i];
  return a;
}

Napi::Float32Array to_f32(Napi::Env env, const at::Tensor& t) {
  at::Tensor c = t.to(at::kFloat).contiguous();
  Napi::Float32Array a = Napi::Float32Array::New(env, static_cast<size_t>(c.numel()));
  const float* p = c.data_ptr<float>();
  for (int64_t i = 0; i < c.numel(); ++i) a[static_cast<size_t>(i)] = p[i];
  return a;
}

Napi::Value SchedulerInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string name = string_arg(info, 0, "name");
  std::string config = string_arg(info, 1, "configJson");
  int64_t steps = steps_arg(info, 2);
  std::unique_ptr<Scheduler> s;
  try {
    s = make_scheduler(name, parse_config(config), steps);
  } catch (const c10::Error& e) {
    throw Napi::Error::New(env, "schedulerInfo(" + name + "): " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, "schedulerInfo(" + name + "): " + e.what());
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("name", s->name());
  o.Set("timesteps", to_f64(env, s->timesteps()));
  o.Set("timestepDtype", s->timestep_tensor(0).scalar_type() == at::kFloat ? "F32" : "I64");
  if (!s->sigmas().empty()) o.Set("sigmas", to_f64(env, std::vector<double>(s->sigmas().begin(), s->sigmas().end())));
  o.Set("initNoiseSigma", static_cast<double>(s->init_noise_sigma()));
  o.Set("numModelCalls", static_cast<double>(s->num_model_calls()));
  o.Set("betas", to_f32(env, s->schedule().betas));
  o.Set("alphasCumprod", to_f32(env, s->schedule().alphas_cumprod));
  return o;
}

class TrajectoryWorker : public PromiseWorker {
 public:
  TrajectoryWorker(Napi::Env env, std::string name, std::string config, int64_t steps, at::Tensor noise, SchedulerOptions options,
                   bool has_seed, uint64_t seed, at::Tensor variance_noise)
      : PromiseWorker(env, "schedulerTrajectory(" + name + ")"), name_(std::move(name)), config_(std::move(config)), steps_(steps),
        noise_(std::move(noise)), options_(options), has_seed_(has_seed), seed_(seed), variance_noise_(std::move(variance_noise)) {}

 protected:
  void Run() override {
    std::unique_ptr<Scheduler> s = make_scheduler(name_, parse_config(config_), steps_, options_);
    TORCH_CHECK(noise_.is_floating_point(), "noise must be a floating-point tensor, got ", noise_.scalar_type());
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed_);
    timesteps_ = s->timesteps_tensor();
    result_ = run_sampling_loop(*s, noise_, fixture_fake_model, has_seed_ ? &gen : nullptr, variance_noise_, /*record=*/true);
  }
  Napi::Value Result(Napi::Env env) override {
    Napi::Object o = Napi::Object::New(env);
    o.Set("timesteps", tensor_to_js(env, timesteps_));
    o.Set("trajectory", tensor_to_js(env, result_.trajectory));
    o.Set("model_inputs", tensor_to_js(env, result_.model_inputs));
    o.Set("model_outputs", tensor_to_js(env, result_.model_outputs));
    return o;
  }

 private:
  std::string name_, config_;
  int64_t steps_;
  at::Tensor noise_;
  SchedulerOptions options_;
  bool has_seed_;
  uint64_t seed_;
  at::Tensor variance_noise_, timesteps_;
  Trajectory result_;
};

Napi::Value SchedulerTrajectory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string name = string_arg(info, 0, "name");
  std::string config = string_arg(info, 1, "configJson");
  int64_t steps = steps_arg(info, 2);
  if (info.Length() < 4) throw Napi::TypeError::New(env, "Expected a tensor for noise");
  at::Tensor noise = tensor_from_js(info[3], "noise");
  SchedulerOptions options;
  bool has_seed = false;
  uint64_t seed = 0;
  at::Tensor variance_noise;
  if (info.Length() > 4 && info[4].IsObject()) {
    Napi::Object o = info[4].As<Napi::Object>();
    if (o.Has("eta") && !o.Get("eta").IsUndefined()) {
      if (!o.Get("eta").IsNumber()) throw Napi::TypeError::New(env, "Expected a number for options.eta");
      options.eta = o.Get("eta").As<Napi::Number>().DoubleValue();
    }
    if (o.Has("seed") && !o.Get("seed").IsUndefined()) {
      if (!o.Get("seed").IsNumber()) throw Napi::TypeError::New(env, "Expected a non-negative integer for options.seed");
      double d = o.Get("seed").As<Napi::Number>().DoubleValue();
      if (!(d >= 0 && d <= 9007199254740991.0 && d == std::floor(d))) throw Napi::TypeError::New(env, "Expected a non-negative integer for options.seed");
      has_seed = true;
      seed = static_cast<uint64_t>(d);
    }
    if (o.Has("varianceNoise") && !o.Get("varianceNoise").IsUndefined()) variance_noise = tensor_from_js(o.Get("varianceNoise"), "options.varianceNoise");
  }
  auto* w = new TrajectoryWorker(env, name, config, steps, noise, options, has_seed, seed, variance_noise);
  w->Queue();
  return w->Promise();
}

class AddNoiseWorker : public PromiseWorker {
 public:
  AddNoiseWorker(Napi::Env env, std::string config, at::Tensor x0, at::Tensor noise, at::Tensor timesteps)
      : PromiseWorker(env, "ddpmAddNoise"), config_(std::move(config)), x0_(std::move(x0)), noise_(std::move(noise)), timesteps_(std::move(timesteps)) {}

 protected:
  void Run() override {
    // the betas depend only on the keys every resolved scheduler config has
    NoiseSchedule schedule = NoiseSchedule::from_config(BetaScheduleConfig::from_json(parse_config(config_)));
    out_ = add_noise(schedule.alphas_cumprod, x0_, noise_, timesteps_);
  }
  Napi::Value Result(Napi::Env env) override { return tensor_to_js(env, out_); }

 private:
  std::string config_;
  at::Tensor x0_, noise_, timesteps_, out_;
};

Napi::Value DdpmAddNoise(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string config = string_arg(info, 0, "configJson");
  if (info.Length() < 4) throw Napi::TypeError::New(env, "Expected ddpmAddNoise(configJson, x0, noise, timesteps)");
  auto* w = new AddNoiseWorker(env, config, tensor_from_js(info[1], "x0"), tensor_from_js(info[2], "noise"), tensor_from_js(info[3], "timesteps"));
  w->Queue();
  return w->Promise();
}

}  // namespace

void register_schedulers(Napi::Env env, Napi::Object exports) {
  exports.Set("schedulerInfo", Napi::Function::New(env, SchedulerInfo, "schedulerInfo"));
  exports.Set("schedulerTrajectory", Napi::Function::New(env, SchedulerTrajectory, "schedulerTrajectory"));
  exports.Set("ddpmAddNoise", Napi::Function::New(env, DdpmAddNoise, "ddpmAddNoise"));
}

}  // namespace si
