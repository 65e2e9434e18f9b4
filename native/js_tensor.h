// Moving tensors across the JS boundary. Only ever called on the main thread: workers receive
// at::Tensor copies made here and hand results back through OnOK.
#pragma once

#include <ATen/ATen.h>
#include <napi.h>

#include <string>

namespace si {

// { data: TypedArray, shape: number[], dtype?: "F32" | ... } -> an owning CPU tensor (a copy).
// `what` names the argument in errors ("inputs.sample").
at::Tensor tensor_from_js(const Napi::Value& value, const std::string& what);

// A CPU copy of `t` as { dtype, shape, data }. F16/BF16 come back as Uint16Array bit patterns,
// BOOL as Uint8Array, I64 as BigInt64Array.
Napi::Object tensor_to_js(Napi::Env env, const at::Tensor& t);

}  // namespace si
