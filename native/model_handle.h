// A model loaded by loadModel(), as other native jobs (generation, training) receive it from JS.
#pragma once

#include <ATen/ATen.h>
#include <napi.h>

#include <memory>
#include <mutex>
#include <string>

#include "model.h"

namespace si {

// Shared by the JS handle and every job in flight; `mutex` serialises jobs on one model, so a
// handle can take concurrent calls from JS without two threads in the same module.
struct LoadedModel {
  std::string kind;
  std::shared_ptr<NativeModel> model;
  at::TensorOptions opts;
  std::mutex mutex;
};

// The model behind a ModelHandle passed from JS (main thread only). Throws a JS TypeError naming
// `what` when the value is not a live handle of `kind`.
std::shared_ptr<LoadedModel> unwrap_model(const Napi::Value& value, const std::string& what, const std::string& kind);

}  // namespace si
