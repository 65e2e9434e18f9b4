// Model registry, config readers and the JS bindings for loaded models:
//   loadModel(kind, configJson, { files, map? } | { files: [], random: seed }, { device, dtype, channelsLast? }) -> Promise<ModelHandle>
//     random: no files, every weight drawn by random_init (benchmarks at full size without downloads)
//     channelsLast: the UNet's conv weights and inputs in channels-last memory order (other kinds ignore it)
//   describeModel(kind, configJson) -> [[key, shape], ...]   (built on the meta device, no memory)
//   ModelHandle.run(method, inputs) -> Promise<outputs>, .dispose()
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <napi.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bindings.h"
#include "js_tensor.h"
#include "model.h"
#include "model_handle.h"
#include "precision.h"
#include "random_init.h"
#include "safetensors.h"
#include "unet.h"
#include "weights.h"
#include "worker.h"

namespace si {

// ---------------------------------------------------------------- registry and config readers

std::shared_ptr<NativeModel> make_model(const std::string& kind, const JsonValue& config, const at::TensorOptions& opts) {
  if (kind == "unet") return make_unet(config, opts);
  if (kind == "vae") return make_vae(config, opts);
  if (kind == "clip_text") return make_clip_text(config, opts);
  if (kind == "clip_vision") return make_clip_vision(config, opts);
  if (kind == "clip") return make_clip(config, opts);
  if (kind == "vit") return make_vit(config, opts);
  if (kind == "lpips") return make_lpips(config, opts);
  throw std::invalid_argument("unknown model kind \"" + kind + "\" (expected unet, vae, clip_text, clip_vision, clip, vit or lpips)");
}

bool cfg_has(const JsonValue& cfg, const std::string& key) {
  for (const auto& [k, v] : cfg.fields)
    if (k == key) return v.kind != JsonValue::Null;
  return false;
}

const JsonValue& cfg_get(const JsonValue& cfg, const std::string& key) {
  for (const auto& [k, v] : cfg.fields)
    if (k == key) return v;
  throw std::invalid_argument("config key \"" + key + "\" is missing");
}

double cfg_double(const JsonValue& cfg, const std::string& key) {
  const JsonValue& v = cfg_get(cfg, key);
  if (v.kind != JsonValue::Number) throw std::invalid_argument("config key \"" + key + "\" is a " + v.kind_name() + ", expected a number");
  return std::stod(v.text);
}

int64_t cfg_int(const JsonValue& cfg, const std::string& key) {
  double d = cfg_double(cfg, key);
  if (d != static_cast<double>(static_cast<int64_t>(d))) throw std::invalid_argument("config key \"" + key + "\" is " + cfg_get(cfg, key).text + ", expected an integer");
  return static_cast<int64_t>(d);
}

bool cfg_bool(const JsonValue& cfg, const std::string& key) {
  const JsonValue& v = cfg_get(cfg, key);
  if (v.kind != JsonValue::Bool) throw std::invalid_argument("config key \"" + key + "\" is a " + v.kind_name() + ", expected a boolean");
  return v.boolean;
}

std::string cfg_string(const JsonValue& cfg, const std::string& key) {
  const JsonValue& v = cfg_get(cfg, key);
  if (v.kind != JsonValue::String) throw std::invalid_argument("config key \"" + key + "\" is a " + v.kind_name() + ", expected a string");
  return v.text;
}

std::vector<int64_t> cfg_int_list(const JsonValue& cfg, const std::string& key) {
  const JsonValue& v = cfg_get(cfg, key);
  if (v.kind != JsonValue::Array) throw std::invalid_argument("config key \"" + key + "\" is a " + v.kind_name() + ", expected an array of integers");
  std::vector<int64_t> out;
  for (const auto& item : v.items) {
    if (item.kind != JsonValue::Number) throw std::invalid_argument("config key \"" + key + "\" must hold integers");
    out.push_back(static_cast<int64_t>(std::stod(item.text)));
  }
  return out;
}

std::vector<std::string> cfg_string_list(const JsonValue& cfg, const std::string& key) {
  const JsonValue& v = cfg_get(cfg, key);
  if (v.kind != JsonValue::Array) throw std::invalid_argument("config key \"" + key + "\" is a " + v.kind_name() + ", expected an array of strings");
  std::vector<std::string> out;
  for (const auto& item : v.items) {
    if (item.kind != JsonValue::String) throw std::invalid_argument("config key \"" + key + "\" must hold strings");
    out.push_back(item.text);
  }
  return out;
}

const at::Tensor& input(const TensorMap& inputs, const std::string& name) {
  auto it = inputs.find(name);
  if (it == inputs.end()) throw std::invalid_argument("missing input \"" + name + "\"");
  return it->second;
}

// ---------------------------------------------------------------- bindings

namespace {

struct AddonData {
  Napi::FunctionReference model_handle;
};

at::TensorOptions parse_options(Napi::Env env, const Napi::Value& v) {
  std::string device = "cpu", dtype = "F32";
  if (v.IsObject()) {
    Napi::Object o = v.As<Napi::Object>();
    if (o.Get("device").IsString()) device = o.Get("device").As<Napi::String>().Utf8Value();
    if (o.Get("dtype").IsString()) dtype = o.Get("dtype").As<Napi::String>().Utf8Value();
  }
  at::ScalarType st;
  if (dtype == "F32") st = at::kFloat;
  else if (dtype == "F16") st = at::kHalf;
  else if (dtype == "BF16") st = at::kBFloat16;
  else throw Napi::TypeError::New(env, "Expected one of F32, F16, BF16 for options.dtype but received " + dtype);
  try {
    return at::TensorOptions().dtype(st).device(at::Device(device));
  } catch (const c10::Error&) {
    throw Napi::TypeError::New(env, "Expected a device such as \"cpu\" or \"cuda:0\" for options.device but received " + device);
  }
}

// What loadModel does besides reading weights.
struct LoadFlags {
  bool random = false;     // fill with random_init(seed) instead of reading files
  uint64_t seed = 0;
  bool channels_last = false;  // UNet only (see UNet2DConditionModelImpl::set_channels_last)
};

bool channels_last_option(Napi::Env env, const Napi::Value& v) {
  if (!v.IsObject()) return false;
  Napi::Value c = v.As<Napi::Object>().Get("channelsLast");
  if (c.IsUndefined() || c.IsNull()) return false;
  if (!c.IsBoolean()) throw Napi::TypeError::New(env, "Expected a boolean for options.channelsLast");
  return c.As<Napi::Boolean>().Value();
}

class LoadWorker : public PromiseWorker {
 public:
  LoadWorker(Napi::Env env, std::string kind, std::string config, std::vector<std::string> files,
             std::vector<WeightSource> map, bool identity, at::TensorOptions opts, LoadFlags flags)
      : PromiseWorker(env, "loadModel(" + kind + ")"), kind_(std::move(kind)), config_(std::move(config)),
        files_(std::move(files)), map_(std::move(map)), identity_(identity), opts_(opts), flags_(flags) {}

 protected:
  void Run() override {
    JsonValue cfg = parse_json(config_.data(), config_.size());
    auto loaded = std::make_shared<LoadedModel>();
    loaded->kind = kind_;
    loaded->opts = opts_;
    loaded->model = make_model(kind_, cfg, opts_);
    if (flags_.random) {
      loaded_count_ = random_init(loaded->model->module(), flags_.seed);
      finish(loaded);
      return;
    }
    std::vector<std::shared_ptr<SafetensorsFile>> opened;
    for (const auto& f : files_) opened.push_back(SafetensorsFile::open(f));
    if (identity_) {
      map_.clear();
      for (size_t i = 0; i < opened.size(); ++i)
        for (const auto& t : opened[i]->tensors()) map_.push_back({t.name, i, t.name, false});
    }
    loaded_count_ = load_weights_strict(loaded->model->module(), opened, map_, kind_);
    finish(loaded);
  }
  void finish(const std::shared_ptr<LoadedModel>& loaded) {
    loaded->model->module().eval();
    if (flags_.channels_last && kind_ == "unet") dynamic_cast<UNet2DConditionModelImpl&>(loaded->model->module()).set_channels_last(true);
    loaded_ = loaded;
  }
  Napi::Value Result(Napi::Env env) override {
    auto* data = env.GetInstanceData<AddonData>();
    auto* holder = new std::shared_ptr<LoadedModel>(loaded_);
    Napi::External<std::shared_ptr<LoadedModel>> ext = Napi::External<std::shared_ptr<LoadedModel>>::New(
        env, holder, [](Napi::Env, std::shared_ptr<LoadedModel>* p) { delete p; });
    Napi::Object handle = data->model_handle.New({ext});
    handle.Set("loadedTensors", static_cast<double>(loaded_count_));
    return handle;
  }

 private:
  std::string kind_, config_;
  std::vector<std::string> files_;
  std::vector<WeightSource> map_;
  bool identity_;
  at::TensorOptions opts_;
  LoadFlags flags_;
  std::shared_ptr<LoadedModel> loaded_;
  size_t loaded_count_ = 0;
};

class RunWorker : public PromiseWorker {
 public:
  RunWorker(Napi::Env env, std::shared_ptr<LoadedModel> model, std::string method, TensorMap inputs)
      : PromiseWorker(env, model->kind + "." + method), model_(std::move(model)), method_(std::move(method)), inputs_(std::move(inputs)) {}

 protected:
  void Run() override {
    std::lock_guard<std::mutex> lock(model_->mutex);
    torch::NoGradGuard no_grad;  // per thread: must be created here, on the worker
    TensorMap moved;
    for (const auto& [k, v] : inputs_) {
      // floating inputs take the model's dtype and device; integer inputs (ids, timesteps) keep theirs
      // (a float timestep stays float32: fractional Euler timesteps must not round to fp16)
      bool cast = v.is_floating_point() && k != "timestep";
      moved[k] = cast ? v.to(model_->opts.device(), model_->opts.dtype().toScalarType()) : v.to(model_->opts.device());
    }
    outputs_ = with_precision_hint(model_->opts, [&] { return model_->model->run(method_, moved); });
  }
  Napi::Value Result(Napi::Env env) override {
    Napi::Object o = Napi::Object::New(env);
    for (const auto& [k, v] : outputs_) o.Set(k, tensor_to_js(env, v.is_floating_point() ? v.to(at::kFloat) : v));
    return o;
  }

 private:
  std::shared_ptr<LoadedModel> model_;
  std::string method_;
  TensorMap inputs_, outputs_;
};

// The model's parameters in their own dtype, for checks and exports (a copy; nothing shared).
class StateDictWorker : public PromiseWorker {
 public:
  StateDictWorker(Napi::Env env, std::shared_ptr<LoadedModel> model)
      : PromiseWorker(env, model->kind + ".stateDict"), model_(std::move(model)) {}

 protected:
  void Run() override {
    std::lock_guard<std::mutex> lock(model_->mutex);
    torch::NoGradGuard no_grad;
    for (const auto& p : model_->model->module().named_parameters(true)) tensors_.emplace_back(p.key(), p.value().detach().to(at::kCPU).clone());
  }
  Napi::Value Result(Napi::Env env) override {
    Napi::Object o = Napi::Object::New(env);
    for (const auto& [k, v] : tensors_) o.Set(k, tensor_to_js(env, v));
    return o;
  }

 private:
  std::shared_ptr<LoadedModel> model_;
  std::vector<std::pair<std::string, at::Tensor>> tensors_;
};

class ModelHandle : public Napi::ObjectWrap<ModelHandle> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "ModelHandle",
                       {InstanceMethod("run", &ModelHandle::Run), InstanceMethod("dispose", &ModelHandle::Dispose),
                        InstanceMethod("stateDict", &ModelHandle::StateDict),
                        InstanceMethod("applyLora", &ModelHandle::ApplyLora), InstanceMethod("createLora", &ModelHandle::CreateLora),
                        InstanceMethod("setLora", &ModelHandle::SetLora), InstanceMethod("clearLora", &ModelHandle::ClearLora),
                        InstanceMethod("collectLora", &ModelHandle::CollectLora),
                        InstanceAccessor("kind", &ModelHandle::Kind, nullptr)});
  }
  explicit ModelHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ModelHandle>(info) {
    if (info.Length() != 1 || !info[0].IsExternal()) throw Napi::TypeError::New(info.Env(), "ModelHandle is created by loadModel()");
    model_ = *info[0].As<Napi::External<std::shared_ptr<LoadedModel>>>().Data();
  }

 private:
  Napi::Value Kind(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), model_ ? model_->kind : "disposed"); }

  Napi::Value Run(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!model_) throw Napi::Error::New(env, "This model was disposed");
    if (info.Length() < 2 || !info[0].IsString() || !info[1].IsObject()) throw Napi::TypeError::New(env, "Expected run(method: string, inputs: object)");
    std::string method = info[0].As<Napi::String>().Utf8Value();
    TensorMap inputs;
    Napi::Object obj = info[1].As<Napi::Object>();
    Napi::Array names = obj.GetPropertyNames();
    for (uint32_t i = 0; i < names.Length(); ++i) {
      std::string name = names.Get(i).As<Napi::String>().Utf8Value();
      inputs[name] = tensor_from_js(obj.Get(name), "inputs." + name);
    }
    auto* w = new RunWorker(env, model_, method, std::move(inputs));
    w->Queue();
    return w->Promise();
  }

  Napi::Value StateDict(const Napi::CallbackInfo& info) {
    if (!model_) throw Napi::Error::New(info.Env(), "This model was disposed");
    auto* w = new StateDictWorker(info.Env(), model_);
    w->Queue();
    return w->Promise();
  }

  // LoRA (lora_bindings.cc): the adapters live on the model's layers, and every LoRA job takes the
  // model's mutex like RunWorker does.
  Napi::Value ApplyLora(const Napi::CallbackInfo& info) { return Lora(info, "applyLora"); }
  Napi::Value CreateLora(const Napi::CallbackInfo& info) { return Lora(info, "createLora"); }
  Napi::Value SetLora(const Napi::CallbackInfo& info) { return Lora(info, "setLora"); }
  Napi::Value ClearLora(const Napi::CallbackInfo& info) { return Lora(info, "clearLora"); }
  Napi::Value CollectLora(const Napi::CallbackInfo& info) { return Lora(info, "collectLora"); }
  Napi::Value Lora(const Napi::CallbackInfo& info, const char* method) {
    if (!model_) throw Napi::Error::New(info.Env(), "This model was disposed");
    return lora_method(info, method, model_->kind, model_->model, std::shared_ptr<std::mutex>(model_, &model_->mutex));
  }

  // Drops this handle's reference; jobs in flight keep the model alive until they finish.
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    model_.reset();
    return info.Env().Undefined();
  }

  std::shared_ptr<LoadedModel> model_;

 public:
  std::shared_ptr<LoadedModel> loaded() const { return model_; }
};

Napi::Value LoadModel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsString() || !info[1].IsString() || !info[2].IsObject())
    throw Napi::TypeError::New(env, "Expected loadModel(kind: string, configJson: string, weights: { files, map? }, options?)");
  std::string kind = info[0].As<Napi::String>().Utf8Value();
  std::string config = info[1].As<Napi::String>().Utf8Value();
  Napi::Object weights = info[2].As<Napi::Object>();
  if (!weights.Get("files").IsArray()) throw Napi::TypeError::New(env, "Expected an array of paths for weights.files");
  std::vector<std::string> files;
  Napi::Array fa = weights.Get("files").As<Napi::Array>();
  for (uint32_t i = 0; i < fa.Length(); ++i) files.push_back(fa.Get(i).ToString().Utf8Value());
  std::vector<WeightSource> map;
  LoadFlags flags;
  Napi::Value random = weights.Get("random");
  if (!random.IsUndefined() && !random.IsNull()) {
    const double seed = random.IsNumber() ? random.As<Napi::Number>().DoubleValue() : -1;
    if (!(seed >= 0 && seed <= 9007199254740991.0 && seed == std::floor(seed)))
      throw Napi::TypeError::New(env, "Expected a non-negative safe integer seed for weights.random");
    if (!files.empty()) throw Napi::TypeError::New(env, "Expected no weights.files with weights.random (the weights are drawn, not read)");
    flags.random = true;
    flags.seed = static_cast<uint64_t>(seed);
  }
  flags.channels_last = channels_last_option(env, info[3]);
  bool identity = !weights.Get("map").IsArray();
  if (!identity) {
    Napi::Array ma = weights.Get("map").As<Napi::Array>();
    for (uint32_t i = 0; i < ma.Length(); ++i) {
      Napi::Array e = ma.Get(i).As<Napi::Array>();
      map.push_back({e.Get(0u).ToString().Utf8Value(), static_cast<size_t>(e.Get(1u).ToNumber().Int64Value()),
                     e.Get(2u).ToString().Utf8Value(), e.Length() > 3 && e.Get(3u).ToBoolean().Value()});
    }
  }
  auto* w = new LoadWorker(env, kind, config, std::move(files), std::move(map), identity, parse_options(env, info[3]), flags);
  w->Queue();
  return w->Promise();
}

Napi::Value DescribeModel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsString())
    throw Napi::TypeError::New(env, "Expected describeModel(kind: string, configJson: string)");
  std::string config = info[1].As<Napi::String>().Utf8Value();
  std::shared_ptr<NativeModel> model;
  try {
    JsonValue cfg = parse_json(config.data(), config.size());
    model = make_model(info[0].As<Napi::String>().Utf8Value(), cfg, at::TensorOptions().device(at::kMeta).dtype(at::kFloat));
  } catch (const c10::Error& e) {
    throw Napi::Error::New(env, std::string("describeModel: ") + e.what_without_backtrace());
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, std::string("describeModel: ") + e.what());
  }
  Napi::Array out = Napi::Array::New(env);
  uint32_t i = 0;
  for (const auto& p : model->module().named_parameters(true)) {
    Napi::Array shape = Napi::Array::New(env);
    for (size_t d = 0; d < p.value().dim(); ++d) shape.Set(static_cast<uint32_t>(d), static_cast<double>(p.value().size(d)));
    Napi::Array entry = Napi::Array::New(env, 2);
    entry.Set(0u, p.key());
    entry.Set(1u, shape);
    out.Set(i++, entry);
  }
  return out;
}

}  // namespace

std::shared_ptr<LoadedModel> unwrap_model(const Napi::Value& value, const std::string& what, const std::string& kind) {
  Napi::Env env = value.Env();
  auto* data = env.GetInstanceData<AddonData>();
  if (!value.IsObject() || !value.As<Napi::Object>().InstanceOf(data->model_handle.Value()))
    throw Napi::TypeError::New(env, "Expected a loaded " + kind + " model for " + what);
  std::shared_ptr<LoadedModel> m = ModelHandle::Unwrap(value.As<Napi::Object>())->loaded();
  if (!m) throw Napi::Error::New(env, what + ": this model was disposed");
  if (m->kind != kind) throw Napi::TypeError::New(env, "Expected a " + kind + " model for " + what + " but received a " + m->kind + " model");
  return m;
}

void register_models(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  data->model_handle = Napi::Persistent(ModelHandle::Define(env));
  env.SetInstanceData(data);
  exports.Set("loadModel", Napi::Function::New(env, LoadModel, "loadModel"));
  exports.Set("describeModel", Napi::Function::New(env, DescribeModel, "describeModel"));
}

}  // namespace si
