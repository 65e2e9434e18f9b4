// Each binding file registers its own exports; addon.cc only calls these.
#pragma once

#include <napi.h>

#include <memory>
#include <mutex>
#include <string>

namespace si {
class NativeModel;

void register_io(Napi::Env env, Napi::Object exports);
void register_models(Napi::Env env, Napi::Object exports);
void register_schedulers(Napi::Env env, Napi::Object exports);
void register_lora(Napi::Env env, Napi::Object exports);
void register_generate(Napi::Env env, Napi::Object exports);
void register_train(Napi::Env env, Napi::Object exports);
void register_device(Napi::Env env, Napi::Object exports);

// buildInfo()'s CUDA fields (device_bindings.cc): cudaExtras, cudaDevices.
void add_cuda_build_info(Napi::Env env, Napi::Object info);

// ModelHandle's LoRA methods (applyLora, createLora, setLora, clearLora, collectLora), defined in
// lora_bindings.cc. `lock` is the model's job mutex, as an aliasing pointer that keeps the model alive.
Napi::Value lora_method(const Napi::CallbackInfo& info, const std::string& method, const std::string& kind,
                        std::shared_ptr<NativeModel> model, std::shared_ptr<std::mutex> lock);
}  // namespace si
