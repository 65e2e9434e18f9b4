// Entry point of the addon: registers exports and nothing else.
#include <napi.h>

#include "bindings.h"

namespace {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  si::register_io(env, exports);
  si::register_models(env, exports);
  si::register_schedulers(env, exports);
  si::register_lora(env, exports);
  si::register_generate(env, exports);
  si::register_train(env, exports);
  si::register_device(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(singleinsert_native, Init)
