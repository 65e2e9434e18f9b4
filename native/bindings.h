// Each binding file registers its own exports; addon.cc only calls these.
#pragma once

#include <napi.h>

namespace si {
void register_io(Napi::Env env, Napi::Object exports);
void register_models(Napi::Env env, Napi::Object exports);
}  // namespace si
