// JS bindings for safetensors files and build information.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <napi.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bindings.h"
#include "js_tensor.h"
#include "safetensors.h"
#include "worker.h"

namespace si {

namespace {

std::string string_arg(const Napi::CallbackInfo& info, size_t i, const char* what) {
  if (info.Length() <= i || !info[i].IsString()) throw Napi::TypeError::New(info.Env(), std::string("Expected a string for ") + what);
  return info[i].As<Napi::String>().Utf8Value();
}

// Keys come from the file, so define own properties: a plain Set("__proto__", v) would replace the
// object's prototype and the entry would vanish.
void set_own(Napi::Object o, const std::string& key, Napi::Value value) {
  o.DefineProperty(Napi::PropertyDescriptor::Value(
      key, value, static_cast<napi_property_attributes>(napi_writable | napi_enumerable | napi_configurable)));
}

Napi::Object metadata_to_js(Napi::Env env, const std::map<std::string, std::string>& m) {
  Napi::Object o = Napi::Object::New(env);
  for (const auto& [k, v] : m) set_own(o, k, Napi::String::New(env, v));
  return o;
}

// readSafetensors(path) -> { metadata, tensors: { name: { dtype, shape, data } } }
class ReadWorker : public PromiseWorker {
 public:
  ReadWorker(Napi::Env env, std::string path, bool header_only)
      : PromiseWorker(env, "readSafetensors(" + path + ")"), path_(std::move(path)), header_only_(header_only) {}

 protected:
  void Run() override {
    file_ = SafetensorsFile::open(path_);
    if (!header_only_)
      for (const auto& t : file_->tensors()) tensors_.emplace_back(t.name, file_->load(t.name));
  }
  Napi::Value Result(Napi::Env env) override {
    Napi::Object out = Napi::Object::New(env);
    out.Set("metadata", metadata_to_js(env, file_->metadata()));
    Napi::Object tensors = Napi::Object::New(env);
    if (header_only_) {
      for (const auto& t : file_->tensors()) {
        Napi::Object o = Napi::Object::New(env);
        o.Set("dtype", t.dtype);
        Napi::Array shape = Napi::Array::New(env, t.shape.size());
        for (size_t i = 0; i < t.shape.size(); ++i) shape.Set(static_cast<uint32_t>(i), static_cast<double>(t.shape[i]));
        o.Set("shape", shape);
        o.Set("byteLength", static_cast<double>(t.end - t.begin));
        set_own(tensors, t.name, o);
      }
    } else {
      for (const auto& [name, t] : tensors_) set_own(tensors, name, tensor_to_js(env, t));
    }
    out.Set("tensors", tensors);
    return out;
  }

 private:
  std::string path_;
  bool header_only_;
  std::shared_ptr<SafetensorsFile> file_;
  std::vector<std::pair<std::string, at::Tensor>> tensors_;
};

class WriteWorker : public PromiseWorker {
 public:
  WriteWorker(Napi::Env env, std::string path, std::vector<std::pair<std::string, at::Tensor>> tensors,
              std::map<std::string, std::string> metadata)
      : PromiseWorker(env, "writeSafetensors(" + path + ")"),
        path_(std::move(path)), tensors_(std::move(tensors)), metadata_(std::move(metadata)) {}

 protected:
  void Run() override { write_safetensors(path_, tensors_, metadata_); }

 private:
  std::string path_;
  std::vector<std::pair<std::string, at::Tensor>> tensors_;
  std::map<std::string, std::string> metadata_;
};

Napi::Value ReadSafetensors(const Napi::CallbackInfo& info) {
  bool header_only = info.Length() > 1 && info[1].IsBoolean() && info[1].As<Napi::Boolean>().Value();
  auto* w = new ReadWorker(info.Env(), string_arg(info, 0, "path"), header_only);
  w->Queue();
  return w->Promise();
}

Napi::Value WriteSafetensors(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = string_arg(info, 0, "path");
  if (info.Length() < 2 || !info[1].IsObject()) throw Napi::TypeError::New(env, "Expected an object of tensors for tensors");
  Napi::Object obj = info[1].As<Napi::Object>();
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  Napi::Array names = obj.GetPropertyNames();
  for (uint32_t i = 0; i < names.Length(); ++i) {
    std::string name = names.Get(i).As<Napi::String>().Utf8Value();
    tensors.emplace_back(name, tensor_from_js(obj.Get(name), "tensors[\"" + name + "\"]"));
  }
  std::map<std::string, std::string> metadata;
  if (info.Length() > 2 && info[2].IsObject()) {
    Napi::Object m = info[2].As<Napi::Object>();
    Napi::Array keys = m.GetPropertyNames();
    for (uint32_t i = 0; i < keys.Length(); ++i) {
      std::string k = keys.Get(i).As<Napi::String>().Utf8Value();
      Napi::Value v = m.Get(k);
      if (!v.IsString()) throw Napi::TypeError::New(env, "Expected a string for metadata[\"" + k + "\"]");
      metadata[k] = v.As<Napi::String>().Utf8Value();
    }
  }
  auto* w = new WriteWorker(env, path, std::move(tensors), std::move(metadata));
  w->Queue();
  return w->Promise();
}

Napi::Value BuildInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("torchVersion", TORCH_VERSION);
  o.Set("torchSource", SI_TORCH_SOURCE);
  bool cuda = torch::cuda::is_available();
  o.Set("cudaAvailable", cuda);
  o.Set("cudaDeviceCount", static_cast<double>(cuda ? torch::cuda::device_count() : 0));
  add_cuda_build_info(env, o);  // cudaExtras, cudaDevices (name, compute capability, memory)
#ifdef NDEBUG
  o.Set("buildType", "Release");
#else
  o.Set("buildType", "Debug");
#endif
  o.Set("threads", at::get_num_threads());
  o.Set("interopThreads", at::get_num_interop_threads());
  o.Set("parallelInfo", at::get_parallel_info());
  o.Set("napiVersion", NAPI_VERSION);
  return o;
}

}  // namespace

void register_io(Napi::Env env, Napi::Object exports) {
  exports.Set("readSafetensors", Napi::Function::New(env, ReadSafetensors, "readSafetensors"));
  exports.Set("writeSafetensors", Napi::Function::New(env, WriteSafetensors, "writeSafetensors"));
  exports.Set("buildInfo", Napi::Function::New(env, BuildInfo, "buildInfo"));
}

}  // namespace si
