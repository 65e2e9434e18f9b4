// JS bindings for LoRA (lora.h):
//   ModelHandle.applyLora(pathOrTensors, { prefix?, scale?, strict?, name? }) -> Promise<report>
//   ModelHandle.createLora({ prefix?, rank, alpha?, name?, seed?, init? }) -> Promise<{ modules, parameters }>
//   ModelHandle.setLora({ name?, scale?, enabled?, merged? }) -> Promise<number of adapters>
//   ModelHandle.clearLora(name?) -> Promise<number of adapters removed>
//   ModelHandle.collectLora({ prefix?, name? }) -> Promise<{ key: tensor }>   (kohya keys)
//   saveLora(path, tensors, metadata?) -> Promise<void>                        (kohya metadata added)
// The handle methods live in models.cc and forward here with the model and its job mutex: every
// job takes that mutex, so a LoRA change never runs while the same model is computing.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <napi.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bindings.h"
#include "js_tensor.h"
#include "lora.h"
#include "model.h"
#include "safetensors.h"
#include "worker.h"

namespace si {

namespace {

// ---------------------------------------------------------------- option parsing (lib/lora.ts validates first)

Napi::Object options_arg(const Napi::CallbackInfo& info, size_t i, const std::string& method) {
  if (info.Length() <= i || info[i].IsUndefined()) return Napi::Object::New(info.Env());
  if (!info[i].IsObject()) throw Napi::TypeError::New(info.Env(), "Expected an object for the options of " + method);
  return info[i].As<Napi::Object>();
}

bool has(const Napi::Object& o, const char* key) { return o.Has(key) && !o.Get(key).IsUndefined(); }

double number_opt(const Napi::Object& o, const char* key, double fallback) {
  if (!has(o, key)) return fallback;
  if (!o.Get(key).IsNumber()) throw Napi::TypeError::New(o.Env(), std::string("Expected a number for options.") + key);
  return o.Get(key).As<Napi::Number>().DoubleValue();
}

bool bool_opt(const Napi::Object& o, const char* key, bool fallback) {
  if (!has(o, key)) return fallback;
  if (!o.Get(key).IsBoolean()) throw Napi::TypeError::New(o.Env(), std::string("Expected a boolean for options.") + key);
  return o.Get(key).As<Napi::Boolean>().Value();
}

std::string string_opt(const Napi::Object& o, const char* key, const std::string& fallback) {
  if (!has(o, key)) return fallback;
  if (!o.Get(key).IsString()) throw Napi::TypeError::New(o.Env(), std::string("Expected a string for options.") + key);
  return o.Get(key).As<Napi::String>().Utf8Value();
}

// The kohya prefix for a model kind; LoRA only targets the UNet and the CLIP text encoder.
std::string prefix_opt(const Napi::Object& o, const std::string& kind) {
  std::string fallback;
  if (kind == "unet") fallback = kLoraUnetPrefix;
  else if (kind == "clip_text") fallback = kLoraTextPrefix;
  else throw Napi::TypeError::New(o.Env(), "LoRA applies to unet and clip_text models, not to " + kind);
  return string_opt(o, "prefix", fallback);
}

Napi::Array string_array(Napi::Env env, const std::vector<std::string>& items) {
  Napi::Array a = Napi::Array::New(env, items.size());
  for (size_t i = 0; i < items.size(); ++i) a.Set(static_cast<uint32_t>(i), items[i]);
  return a;
}

// ---------------------------------------------------------------- jobs

// A job on one model: holds the model alive and takes its mutex around the LoRA change.
class LoraJob : public PromiseWorker {
 public:
  LoraJob(Napi::Env env, const std::string& context, std::shared_ptr<NativeModel> model, std::shared_ptr<std::mutex> lock)
      : PromiseWorker(env, context), model_(std::move(model)), lock_(std::move(lock)) {}

 protected:
  std::shared_ptr<NativeModel> model_;
  std::shared_ptr<std::mutex> lock_;
};

class ApplyJob : public LoraJob {
 public:
  ApplyJob(Napi::Env env, const std::string& context, std::shared_ptr<NativeModel> model, std::shared_ptr<std::mutex> lock,
           std::string path, TensorMap tensors, std::string prefix, double scale, bool strict, std::string name)
      : LoraJob(env, context, std::move(model), std::move(lock)), path_(std::move(path)), tensors_(std::move(tensors)),
        prefix_(std::move(prefix)), scale_(scale), strict_(strict), name_(std::move(name)) {}

 protected:
  void Run() override {
    if (!path_.empty()) {
      // read before taking the lock: the model keeps running meanwhile
      auto file = SafetensorsFile::open(path_);
      for (const auto& t : file->tensors()) tensors_[t.name] = file->load(t.name);
    }
    std::lock_guard<std::mutex> guard(*lock_);
    try {
      report_ = apply_lora(model_->module(), prefix_, tensors_, scale_, strict_, name_);
    } catch (const std::invalid_argument& e) {
      if (path_.empty()) throw;
      throw std::invalid_argument(path_ + ": " + e.what());
    }
  }
  Napi::Value Result(Napi::Env env) override {
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", name_);
    o.Set("prefix", prefix_);
    o.Set("modules", static_cast<double>(report_.modules));
    o.Set("tensors", static_cast<double>(report_.tensors));
    o.Set("fileTensors", static_cast<double>(report_.file_tensors));
    o.Set("otherTensors", static_cast<double>(report_.other_tensors));
    o.Set("missingAlpha", static_cast<double>(report_.missing_alpha));
    o.Set("unknownKeys", string_array(env, report_.unknown));
    return o;
  }

 private:
  std::string path_;
  TensorMap tensors_;
  std::string prefix_;
  double scale_;
  bool strict_;
  std::string name_;
  LoraApplyReport report_;
};

class CreateJob : public LoraJob {
 public:
  CreateJob(Napi::Env env, const std::string& context, std::shared_ptr<NativeModel> model, std::shared_ptr<std::mutex> lock,
            std::string prefix, int64_t rank, double alpha, LoraInit init, std::string name, bool seeded, uint64_t seed)
      : LoraJob(env, context, std::move(model), std::move(lock)), prefix_(std::move(prefix)), rank_(rank), alpha_(alpha), init_(init),
        name_(std::move(name)), seeded_(seeded), seed_(seed) {}

 protected:
  void Run() override {
    c10::optional<at::Generator> gen;
    if (seeded_) gen = at::make_generator<at::CPUGeneratorImpl>(seed_);
    std::lock_guard<std::mutex> guard(*lock_);
    std::vector<at::Tensor> params = create_lora(model_->module(), prefix_, rank_, alpha_, init_, name_, gen);
    modules_ = params.size() / 2;
    for (const auto& p : params) numel_ += p.numel();
  }
  Napi::Value Result(Napi::Env env) override {
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", name_);
    o.Set("prefix", prefix_);
    o.Set("modules", static_cast<double>(modules_));
    o.Set("parameters", static_cast<double>(numel_));
    return o;
  }

 private:
  std::string prefix_;
  int64_t rank_;
  double alpha_;
  LoraInit init_;
  std::string name_;
  bool seeded_;
  uint64_t seed_;
  size_t modules_ = 0;
  int64_t numel_ = 0;
};

// setLora and clearLora: a change to existing adapters, answering how many it touched.
class UpdateJob : public LoraJob {
 public:
  struct Change {
    std::string name;  // empty: every adapter
    bool remove = false;
    bool set_enabled = false, enabled = true;
    bool set_scale = false;
    double scale = 1;
    bool set_merged = false, merged = false;
  };
  UpdateJob(Napi::Env env, const std::string& context, std::shared_ptr<NativeModel> model, std::shared_ptr<std::mutex> lock, Change change)
      : LoraJob(env, context, std::move(model), std::move(lock)), change_(std::move(change)) {}

 protected:
  void Run() override {
    std::lock_guard<std::mutex> guard(*lock_);
    torch::nn::Module& m = model_->module();
    const std::string& name = change_.name;
    if (change_.remove) {
      count_ = remove_lora(m, name);
      return;
    }
    // enable before merging (merge skips disabled adapters), unmerge before disabling
    if (change_.set_merged && !change_.merged) count_ = std::max(count_, unmerge_lora(m, name));
    if (change_.set_enabled) count_ = std::max(count_, set_lora_enabled(m, change_.enabled, name));
    if (change_.set_scale) count_ = std::max(count_, set_lora_scale(m, change_.scale, name));
    if (change_.set_merged && change_.merged) count_ = std::max(count_, merge_lora(m, name));
  }
  Napi::Value Result(Napi::Env env) override { return Napi::Number::New(env, static_cast<double>(count_)); }

 private:
  Change change_;
  size_t count_ = 0;
};

class CollectJob : public LoraJob {
 public:
  CollectJob(Napi::Env env, const std::string& context, std::shared_ptr<NativeModel> model, std::shared_ptr<std::mutex> lock,
             std::string prefix, std::string name)
      : LoraJob(env, context, std::move(model), std::move(lock)), prefix_(std::move(prefix)), name_(std::move(name)) {}

 protected:
  void Run() override {
    std::lock_guard<std::mutex> guard(*lock_);
    // copies taken under the lock: training may update the adapters in place later
    for (const auto& [k, t] : collect_lora(model_->module(), prefix_, name_)) tensors_[k] = t.to(at::kCPU).clone();
  }
  Napi::Value Result(Napi::Env env) override {
    Napi::Object o = Napi::Object::New(env);
    for (const auto& [k, t] : tensors_) o.Set(k, tensor_to_js(env, t));
    return o;
  }

 private:
  std::string prefix_, name_;
  TensorMap tensors_;
};

class SaveJob : public PromiseWorker {
 public:
  SaveJob(Napi::Env env, std::string path, TensorMap tensors, std::map<std::string, std::string> metadata)
      : PromiseWorker(env, "saveLora(" + path + ")"), path_(std::move(path)), tensors_(std::move(tensors)), metadata_(std::move(metadata)) {}

 protected:
  void Run() override { save_lora(path_, tensors_, metadata_); }

 private:
  std::string path_;
  TensorMap tensors_;
  std::map<std::string, std::string> metadata_;
};

Napi::Value SaveLora(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsObject())
    throw Napi::TypeError::New(env, "Expected saveLora(path: string, tensors: object, metadata?: object)");
  std::string path = info[0].As<Napi::String>().Utf8Value();
  TensorMap tensors;
  Napi::Object obj = info[1].As<Napi::Object>();
  Napi::Array names = obj.GetPropertyNames();
  for (uint32_t i = 0; i < names.Length(); ++i) {
    std::string name = names.Get(i).As<Napi::String>().Utf8Value();
    tensors[name] = tensor_from_js(obj.Get(name), "tensors[\"" + name + "\"]");
  }
  std::map<std::string, std::string> metadata;
  if (info.Length() > 2 && info[2].IsObject()) {
    Napi::Object m = info[2].As<Napi::Object>();
    Napi::Array keys = m.GetPropertyNames();
    for (uint32_t i = 0; i < keys.Length(); ++i) {
      std::string k = keys.Get(i).As<Napi::String>().Utf8Value();
      if (!m.Get(k).IsString()) throw Napi::TypeError::New(env, "Expected a string for metadata[\"" + k + "\"]");
      metadata[k] = m.Get(k).As<Napi::String>().Utf8Value();
    }
  }
  auto* w = new SaveJob(env, std::move(path), std::move(tensors), std::move(metadata));
  w->Queue();
  return w->Promise();
}

}  // namespace

Napi::Value lora_method(const Napi::CallbackInfo& info, const std::string& method, const std::string& kind,
                        std::shared_ptr<NativeModel> model, std::shared_ptr<std::mutex> lock) {
  Napi::Env env = info.Env();
  const std::string context = kind + "." + method;
  PromiseWorker* w = nullptr;
  if (method == "applyLora") {
    std::string path;
    TensorMap tensors;
    if (info.Length() > 0 && info[0].IsString()) {
      path = info[0].As<Napi::String>().Utf8Value();
    } else if (info.Length() > 0 && info[0].IsObject()) {
      Napi::Object obj = info[0].As<Napi::Object>();
      Napi::Array names = obj.GetPropertyNames();
      for (uint32_t i = 0; i < names.Length(); ++i) {
        std::string name = names.Get(i).As<Napi::String>().Utf8Value();
        tensors[name] = tensor_from_js(obj.Get(name), "tensors[\"" + name + "\"]");
      }
    } else {
      throw Napi::TypeError::New(env, "Expected applyLora(source: path | { key: tensor }, options?)");
    }
    Napi::Object o = options_arg(info, 1, method);
    w = new ApplyJob(env, context, std::move(model), std::move(lock), path, std::move(tensors), prefix_opt(o, kind),
                     number_opt(o, "scale", 1.0), bool_opt(o, "strict", true), string_opt(o, "name", "default"));
  } else if (method == "createLora") {
    Napi::Object o = options_arg(info, 0, method);
    if (!has(o, "rank")) throw Napi::TypeError::New(env, "Expected a number for options.rank");
    const int64_t rank = static_cast<int64_t>(number_opt(o, "rank", 0));
    const std::string init = string_opt(o, "init", "kaiming_uniform");
    if (init != "kaiming_uniform" && init != "gaussian")
      throw Napi::TypeError::New(env, "Expected \"kaiming_uniform\" or \"gaussian\" for options.init but received " + init);
    w = new CreateJob(env, context, std::move(model), std::move(lock), prefix_opt(o, kind), rank, number_opt(o, "alpha", static_cast<double>(rank)),
                      init == "gaussian" ? LoraInit::Gaussian : LoraInit::KaimingUniform, string_opt(o, "name", "default"), has(o, "seed"),
                      static_cast<uint64_t>(number_opt(o, "seed", 0)));
  } else if (method == "setLora") {
    Napi::Object o = options_arg(info, 0, method);
    UpdateJob::Change c;
    c.name = string_opt(o, "name", "");
    c.set_scale = has(o, "scale");
    c.scale = number_opt(o, "scale", 1.0);
    c.set_enabled = has(o, "enabled");
    c.enabled = bool_opt(o, "enabled", true);
    c.set_merged = has(o, "merged");
    c.merged = bool_opt(o, "merged", false);
    w = new UpdateJob(env, context, std::move(model), std::move(lock), c);
  } else if (method == "clearLora") {
    UpdateJob::Change c;
    c.remove = true;
    if (info.Length() > 0 && !info[0].IsUndefined()) {
      if (!info[0].IsString()) throw Napi::TypeError::New(env, "Expected a LoRA name (string) for clearLora(name?)");
      c.name = info[0].As<Napi::String>().Utf8Value();
    }
    w = new UpdateJob(env, context, std::move(model), std::move(lock), c);
  } else if (method == "collectLora") {
    Napi::Object o = options_arg(info, 0, method);
    w = new CollectJob(env, context, std::move(model), std::move(lock), prefix_opt(o, kind), string_opt(o, "name", "default"));
  } else {
    throw Napi::Error::New(env, "unknown LoRA method " + method);
  }
  Napi::Promise promise = w->Promise();
  w->Queue();
  return promise;
}

void register_lora(Napi::Env env, Napi::Object exports) { exports.Set("saveLora", Napi::Function::New(env, SaveLora, "saveLora")); }

}  // namespace si
