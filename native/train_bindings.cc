// JS bindings for SingleInsert training (train.h). lib/train.ts validates every option first; the
// checks here only guard the native side.
//
//   new Trainer({ unet, vae, textEncoder, encoderConfig, encoderWeights?, scheduleConfig, image, maskLatent,
//                 encoderPixels, idsStar, idsClass, placeholderPositions, gamma?, eta?, fgNorm?, seed, gradCheckpointing? })
//     .init() -> Promise<{ latentShape, hidden, encoderParameters, state, precision: { unet, vae, textEncoder, lossScaling } }>
//     .step({ stage, batch, microBatch?, lr, step, timesteps?, noise?, returnGradients? })
//        -> Promise<{ losses: { fg, bg, sm, total }, gradNorm, skipped, lossScale, memory, state, gradients? }>
//        lossScale: the fp16 loss scale of the step (null without loss scaling); skipped: its update was
//        not applied (inf/NaN gradients); memory: memoryStats() of the device after the step; gradients:
//        with returnGradients, { <checkpoint key>: gradient } (unscaled, before clipping)
//     .startStage2({ rank, alpha? }) -> Promise<{ modules, parameters, state }>
//     .evaluate({ timesteps, noise, microBatch? }) -> Promise<{ fg, bg, sm, total }>
//     .embedding() -> Promise<Tensor [1, C]>
//     .saveCheckpoint(dir, metaJson) -> Promise<void>
//     .loadCheckpoint(dir) -> Promise<{ state, meta }>          (meta: the JSON text given to saveCheckpoint)
//     .exportConcept(dir, metadata) -> Promise<string[]>          (the files written)
//     .dispose() -> Promise<number>                               (LoRA adapters removed from the shared models)
//   state = { stage, stepsDone: [stage I, stage II], lora: { rank, alpha } | null }
//
//   singleinsertLossCase({ unet, vae, textEncoder, scheduleConfig, image, mask_fullres | mask, timesteps, noise,
//                          input_ids_star, input_ids_class, v, lora, lora_target_keys, star_token_id?, gradCheckpointing? })
//     -> Promise<{ L_fg, ..., "intermediate.x0", ... }>   (the singleinsert_losses case, see train.h)
//
// Every method queues one job on a worker thread; jobs hold the trainer alive and take its mutex and
// the three models' mutexes, so calls from JS may overlap safely (they run one after another).
#include <ATen/ATen.h>
#include <napi.h>

#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bindings.h"
#include "js_tensor.h"
#include "losses.h"
#include "model_handle.h"
#include "train.h"
#include "worker.h"

namespace si {

namespace {

// ---------------------------------------------------------------- option parsing

bool has(const Napi::Object& o, const char* key) { return o.Has(key) && !o.Get(key).IsUndefined() && !o.Get(key).IsNull(); }

Napi::Object object_arg(const Napi::CallbackInfo& info, size_t i, const std::string& what) {
  if (info.Length() <= i || !info[i].IsObject()) throw Napi::TypeError::New(info.Env(), "Expected an object for " + what);
  return info[i].As<Napi::Object>();
}

std::string string_arg(const Napi::CallbackInfo& info, size_t i, const std::string& what) {
  if (info.Length() <= i || !info[i].IsString()) throw Napi::TypeError::New(info.Env(), "Expected a string for " + what);
  return info[i].As<Napi::String>().Utf8Value();
}

double number_opt(const Napi::Object& o, const char* key, double fallback, bool required = false) {
  if (!has(o, key)) {
    if (required) throw Napi::TypeError::New(o.Env(), std::string("Expected a number for options.") + key);
    return fallback;
  }
  if (!o.Get(key).IsNumber()) throw Napi::TypeError::New(o.Env(), std::string("Expected a number for options.") + key);
  return o.Get(key).As<Napi::Number>().DoubleValue();
}

int64_t int_opt(const Napi::Object& o, const char* key, int64_t fallback, bool required = false) {
  const double d = number_opt(o, key, static_cast<double>(fallback), required);
  if (!(std::fabs(d) <= 9007199254740991.0) || d != std::floor(d))
    throw Napi::TypeError::New(o.Env(), std::string("Expected an integer for options.") + key + " but received " + std::to_string(d));
  return static_cast<int64_t>(d);
}

std::string string_opt(const Napi::Object& o, const char* key, const std::string& fallback, bool required = false) {
  if (!has(o, key)) {
    if (required) throw Napi::TypeError::New(o.Env(), std::string("Expected a string for options.") + key);
    return fallback;
  }
  if (!o.Get(key).IsString()) throw Napi::TypeError::New(o.Env(), std::string("Expected a string for options.") + key);
  return o.Get(key).As<Napi::String>().Utf8Value();
}

at::Tensor tensor_opt(const Napi::Object& o, const char* key) {
  if (!has(o, key)) throw Napi::TypeError::New(o.Env(), std::string("Expected a tensor { data, shape } for options.") + key);
  return tensor_from_js(o.Get(key), std::string("options.") + key);
}

bool bool_opt(const Napi::Object& o, const char* key, bool fallback) {
  if (!has(o, key)) return fallback;
  if (!o.Get(key).IsBoolean()) throw Napi::TypeError::New(o.Env(), std::string("Expected a boolean for options.") + key);
  return o.Get(key).As<Napi::Boolean>().Value();
}

std::vector<std::string> string_list_opt(const Napi::Object& o, const char* key) {
  if (!has(o, key) || !o.Get(key).IsArray()) throw Napi::TypeError::New(o.Env(), std::string("Expected an array of strings for options.") + key);
  Napi::Array a = o.Get(key).As<Napi::Array>();
  std::vector<std::string> out;
  for (uint32_t i = 0; i < a.Length(); ++i) {
    if (!a.Get(i).IsString()) throw Napi::TypeError::New(o.Env(), std::string("Expected an array of strings for options.") + key);
    out.push_back(a.Get(i).As<Napi::String>().Utf8Value());
  }
  return out;
}

// ---------------------------------------------------------------- results

Napi::Object losses_to_js(Napi::Env env, const Losses& l) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("fg", l.fg);
  o.Set("bg", l.bg);
  o.Set("sm", l.sm);
  o.Set("total", l.total);
  return o;
}

Napi::Object state_to_js(Napi::Env env, const TrainerState& s) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("stage", s.stage);
  Napi::Array done = Napi::Array::New(env, 2);
  done.Set(0u, static_cast<double>(s.steps_done[0]));
  done.Set(1u, static_cast<double>(s.steps_done[1]));
  o.Set("stepsDone", done);
  if (s.lora) {
    Napi::Object l = Napi::Object::New(env);
    l.Set("rank", static_cast<double>(s.lora_rank));
    l.Set("alpha", s.lora_alpha);
    o.Set("lora", l);
  } else {
    o.Set("lora", env.Null());
  }
  return o;
}

Napi::Value bytes_or_null(Napi::Env env, int64_t v) { return v < 0 ? env.Null() : Napi::Number::New(env, static_cast<double>(v)); }

Napi::Object memory_to_js(Napi::Env env, const MemoryStats& m) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("peakAllocatedBytes", bytes_or_null(env, m.peak_allocated));
  o.Set("allocatedBytes", bytes_or_null(env, m.allocated));
  o.Set("reservedBytes", bytes_or_null(env, m.reserved));
  o.Set("peakRssBytes", bytes_or_null(env, m.peak_rss));
  return o;
}

Napi::Object precision_to_js(Napi::Env env, const PrecisionInfo& p) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("unet", p.unet);
  o.Set("vae", p.vae);
  o.Set("textEncoder", p.text);
  o.Set("lossScaling", p.loss_scaling);
  return o;
}

// ---------------------------------------------------------------- jobs

// One trainer call: `run` on the worker thread (plain C++ only), `result` on the main thread.
class TrainerJob : public PromiseWorker {
 public:
  TrainerJob(Napi::Env env, const std::string& context, std::function<void()> run, std::function<Napi::Value(Napi::Env)> result)
      : PromiseWorker(env, context), run_(std::move(run)), result_(std::move(result)) {}

 protected:
  void Run() override { run_(); }
  Napi::Value Result(Napi::Env env) override { return result_ ? result_(env) : env.Undefined(); }

 private:
  std::function<void()> run_;
  std::function<Napi::Value(Napi::Env)> result_;
};

Napi::Value queue(Napi::Env env, const std::string& context, std::function<void()> run, std::function<Napi::Value(Napi::Env)> result = {}) {
  auto* job = new TrainerJob(env, context, std::move(run), std::move(result));
  Napi::Promise promise = job->Promise();
  job->Queue();
  return promise;
}

class TrainerWrap : public Napi::ObjectWrap<TrainerWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Trainer",
                       {InstanceMethod("init", &TrainerWrap::Init), InstanceMethod("step", &TrainerWrap::Step),
                        InstanceMethod("startStage2", &TrainerWrap::StartStage2), InstanceMethod("evaluate", &TrainerWrap::Evaluate),
                        InstanceMethod("embedding", &TrainerWrap::Embedding), InstanceMethod("saveCheckpoint", &TrainerWrap::SaveCheckpoint),
                        InstanceMethod("loadCheckpoint", &TrainerWrap::LoadCheckpoint), InstanceMethod("exportConcept", &TrainerWrap::ExportConcept),
                        InstanceMethod("dispose", &TrainerWrap::Dispose)});
  }

  explicit TrainerWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TrainerWrap>(info) {
    Napi::Env env = info.Env();
    Napi::Object o = object_arg(info, 0, "the Trainer options");
    auto unet = unwrap_model(o.Get("unet"), "options.unet", "unet");
    auto vae = unwrap_model(o.Get("vae"), "options.vae", "vae");
    auto text = unwrap_model(o.Get("textEncoder"), "options.textEncoder", "clip_text");
    TrainerInputs in;
    in.image = tensor_opt(o, "image");
    in.mask_latent = tensor_opt(o, "maskLatent");
    in.encoder_pixels = tensor_opt(o, "encoderPixels");
    in.ids_star = tensor_opt(o, "idsStar");
    in.ids_class = tensor_opt(o, "idsClass");
    if (!has(o, "placeholderPositions") || !o.Get("placeholderPositions").IsArray())
      throw Napi::TypeError::New(env, "Expected an array of integers for options.placeholderPositions");
    Napi::Array positions = o.Get("placeholderPositions").As<Napi::Array>();
    for (uint32_t i = 0; i < positions.Length(); ++i) in.placeholder_positions.push_back(positions.Get(i).ToNumber().Int64Value());
    TrainerConfig cfg;
    cfg.encoder_config = string_opt(o, "encoderConfig", "", true);
    cfg.encoder_weights = string_opt(o, "encoderWeights", "");
    cfg.schedule_config = string_opt(o, "scheduleConfig", "", true);
    cfg.gamma = number_opt(o, "gamma", kDefaultGamma);
    cfg.eta = number_opt(o, "eta", kDefaultEta);
    const std::string fg = string_opt(o, "fgNorm", "mean");
    if (fg != "mean" && fg != "mask") throw Napi::TypeError::New(env, "Expected \"mean\" or \"mask\" for options.fgNorm but received " + fg);
    cfg.fg_norm = fg == "mask" ? FgNorm::Mask : FgNorm::Mean;
    const int64_t seed = int_opt(o, "seed", 0, true);
    if (seed < 0) throw Napi::TypeError::New(env, "Expected a non-negative integer for options.seed");
    cfg.seed = static_cast<uint64_t>(seed);
    cfg.grad_checkpointing = bool_opt(o, "gradCheckpointing", false);
    try {
      trainer_ = std::make_shared<SingleInsertTrainer>(unet, vae, text, std::move(in), std::move(cfg));
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
  }

 private:
  std::shared_ptr<SingleInsertTrainer> live(Napi::Env env) {
    if (!trainer_) throw Napi::Error::New(env, "This trainer was disposed");
    return trainer_;
  }

  Napi::Value Init(const Napi::CallbackInfo& info) {
    auto t = live(info.Env());
    struct R {
      std::vector<int64_t> latent;
      int64_t hidden = 0, params = 0;
      TrainerState state;
      PrecisionInfo precision;
    };
    auto r = std::make_shared<R>();
    return queue(
        info.Env(), "trainer.init",
        [t, r] {
          t->init();
          r->latent = t->latent_shape();
          r->hidden = t->hidden_size();
          r->params = t->encoder_parameters();
          r->state = t->state();
          r->precision = t->precision();
        },
        [r](Napi::Env env) -> Napi::Value {
          Napi::Object o = Napi::Object::New(env);
          Napi::Array shape = Napi::Array::New(env, r->latent.size());
          for (size_t i = 0; i < r->latent.size(); ++i) shape.Set(static_cast<uint32_t>(i), static_cast<double>(r->latent[i]));
          o.Set("latentShape", shape);
          o.Set("hidden", static_cast<double>(r->hidden));
          o.Set("encoderParameters", static_cast<double>(r->params));
          o.Set("state", state_to_js(env, r->state));
          o.Set("precision", precision_to_js(env, r->precision));
          return o;
        });
  }

  Napi::Value Step(const Napi::CallbackInfo& info) {
    auto t = live(info.Env());
    Napi::Object o = object_arg(info, 0, "the step options");
    StepOptions s;
    s.stage = static_cast<int>(int_opt(o, "stage", 1, true));
    s.batch = int_opt(o, "batch", 1, true);
    s.micro_batch = int_opt(o, "microBatch", 0);
    s.lr = number_opt(o, "lr", 0, true);
    s.step = int_opt(o, "step", 0, true);
    if (has(o, "timesteps") || has(o, "noise")) {
      s.timesteps = tensor_opt(o, "timesteps");
      s.noise = tensor_opt(o, "noise");
    }
    s.return_gradients = bool_opt(o, "returnGradients", false);
    struct R {
      StepResult step;
      TrainerState state;
    };
    auto r = std::make_shared<R>();
    return queue(
        info.Env(), "trainer.step",
        [t, s, r] {
          r->step = t->step(s);
          r->state = t->state();
        },
        [r](Napi::Env env) -> Napi::Value {
          Napi::Object o = Napi::Object::New(env);
          o.Set("losses", losses_to_js(env, r->step.losses));
          o.Set("gradNorm", r->step.grad_norm);
          o.Set("skipped", r->step.skipped);
          o.Set("lossScale", r->step.loss_scale > 0 ? Napi::Number::New(env, r->step.loss_scale) : env.Null());
          o.Set("memory", memory_to_js(env, r->step.memory));
          if (!r->step.gradients.empty()) {
            Napi::Object g = Napi::Object::New(env);
            for (const auto& [k, v] : r->step.gradients) g.Set(k, tensor_to_js(env, v));
            o.Set("gradients", g);
          }
          o.Set("state", state_to_js(env, r->state));
          return o;
        });
  }

  Napi::Value StartStage2(const Napi::CallbackInfo& info) {
    auto t = live(info.Env());
    Napi::Object o = object_arg(info, 0, "the startStage2 options");
    const int64_t rank = int_opt(o, "rank", 4, true);
    const double alpha = number_opt(o, "alpha", static_cast<double>(rank));
    struct R {
      std::pair<size_t, int64_t> counts;
      TrainerState state;
    };
    auto r = std::make_shared<R>();
    return queue(
        info.Env(), "trainer.startStage2",
        [t, rank, alpha, r] {
          r->counts = t->start_stage2(rank, alpha);
          r->state = t->state();
        },
        [r](Napi::Env env) -> Napi::Value {
          Napi::Object o = Napi::Object::New(env);
          o.Set("modules", static_cast<double>(r->counts.first));
          o.Set("parameters", static_cast<double>(r->counts.second));
          o.Set("state", state_to_js(env, r->state));
          return o;
        });
  }

  Napi::Value Evaluate(const Napi::CallbackInfo& info) {
    auto t = live(info.Env());
    Napi::Object o = object_arg(info, 0, "the evaluate options");
    at::Tensor timesteps = tensor_opt(o, "timesteps");
    at::Tensor noise = tensor_opt(o, "noise");
    const int64_t micro = int_opt(o, "microBatch", 0);
    auto r = std::make_shared<Losses>();
    return queue(
        info.Env(), "trainer.evaluate", [t, timesteps, noise, micro, r] { *r = t->evaluate(timesteps, noise, micro); },
        [r](Napi::Env env) -> Napi::Value { return losses_to_js(env, *r); });
  }

  Napi::Value Embedding(const Napi::CallbackInfo& info) {
    auto t = live(info.Env());
    auto r = std::make_shared<at::Tensor>();
    return queue(
        info.Env(), "trainer.embedding", [t, r] { *r = t->embedding(); }, [r](Napi::Env env) -> Napi::Value { return tensor_to_js(env, *r); });
  }

  Napi::Value SaveCheckpoint(const Napi::CallbackInfo& info) {
    auto t = live(info.Env());
    const std::string dir = string_arg(info, 0, "the checkpoint folder");
    const std::string meta = info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "{}";
    return queue(info.Env(), "trainer.saveCheckpoint(" + dir + ")", [t, dir, meta] { t->save_checkpoint(dir, meta); });
  }

  Napi::Value LoadCheckpoint(const Napi::CallbackInfo& info) {
    auto t = live(info.Env());
    const std::string dir = string_arg(info, 0, "the checkpoint folder");
    auto r = std::make_shared<CheckpointInfo>();
    return queue(
        info.Env(), "trainer.loadCheckpoint(" + dir + ")", [t, dir, r] { *r = t->load_checkpoint(dir); },
        [r](Napi::Env env) -> Napi::Value {
          Napi::Object o = Napi::Object::New(env);
          o.Set("state", state_to_js(env, r->state));
          o.Set("meta", r->meta_json);
          return o;
        });
  }

  Napi::Value ExportConcept(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto t = live(env);
    const std::string dir = string_arg(info, 0, "the output folder");
    std::map<std::string, std::string> metadata;
    if (info.Length() > 1 && info[1].IsObject()) {
      Napi::Object m = info[1].As<Napi::Object>();
      Napi::Array keys = m.GetPropertyNames();
      for (uint32_t i = 0; i < keys.Length(); ++i) {
        const std::string k = keys.Get(i).As<Napi::String>().Utf8Value();
        if (!m.Get(k).IsString()) throw Napi::TypeError::New(env, "Expected a string for metadata[\"" + k + "\"]");
        metadata[k] = m.Get(k).As<Napi::String>().Utf8Value();
      }
    }
    auto r = std::make_shared<std::vector<std::string>>();
    return queue(
        env, "trainer.exportConcept(" + dir + ")", [t, dir, metadata, r] { *r = t->export_concept(dir, metadata); },
        [r](Napi::Env env) -> Napi::Value {
          Napi::Array a = Napi::Array::New(env, r->size());
          for (size_t i = 0; i < r->size(); ++i) a.Set(static_cast<uint32_t>(i), (*r)[i]);
          return a;
        });
  }

  // Takes the LoRA off the shared models (on the worker: it waits for the models' running jobs).
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!trainer_) return queue(env, "trainer.dispose", [] {}, [](Napi::Env env) -> Napi::Value { return Napi::Number::New(env, 0); });
    auto t = std::move(trainer_);
    auto r = std::make_shared<size_t>(0);
    return queue(
        env, "trainer.dispose", [t, r] { *r = t->dispose(); },
        [r](Napi::Env env) -> Napi::Value { return Napi::Number::New(env, static_cast<double>(*r)); });
  }

  std::shared_ptr<SingleInsertTrainer> trainer_;
};

// ---------------------------------------------------------------- golden loss case

Napi::Value LossCase(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = object_arg(info, 0, "the singleinsertLossCase options");
  auto unet = unwrap_model(o.Get("unet"), "options.unet", "unet");
  auto vae = unwrap_model(o.Get("vae"), "options.vae", "vae");
  auto text = unwrap_model(o.Get("textEncoder"), "options.textEncoder", "clip_text");
  LossCaseInputs in;
  in.image = tensor_opt(o, "image");
  in.mask = has(o, "mask_fullres") ? tensor_opt(o, "mask_fullres") : tensor_opt(o, "mask");
  in.timesteps = tensor_opt(o, "timesteps");
  in.noise = tensor_opt(o, "noise");
  in.ids_star = tensor_opt(o, "input_ids_star");
  in.ids_class = tensor_opt(o, "input_ids_class");
  in.v = tensor_opt(o, "v");
  in.star_token_id = int_opt(o, "star_token_id", 265);
  in.schedule_config = string_opt(o, "scheduleConfig", "", true);
  in.lora_path = string_opt(o, "lora", "", true);
  in.lora_keys = string_list_opt(o, "lora_target_keys");
  in.grad_checkpointing = bool_opt(o, "gradCheckpointing", false);
  auto out = std::make_shared<TensorMap>();
  return queue(
      env, "singleinsertLossCase", [unet, vae, text, in, out] { *out = singleinsert_loss_case(unet, vae, text, in); },
      [out](Napi::Env env) -> Napi::Value {
        Napi::Object o = Napi::Object::New(env);
        for (const auto& [k, v] : *out) o.Set(k, tensor_to_js(env, v));
        return o;
      });
}

}  // namespace

void register_train(Napi::Env env, Napi::Object exports) {
  exports.Set("Trainer", TrainerWrap::Define(env));
  exports.Set("singleinsertLossCase", Napi::Function::New(env, LossCase, "singleinsertLossCase"));
}

}  // namespace si
