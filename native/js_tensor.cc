#include "js_tensor.h"

#include <cstring>
#include <vector>

#include "safetensors.h"

namespace si {

namespace {

// The dtype a typed array implies when the caller gives none.
const char* default_dtype(napi_typedarray_type t) {
  switch (t) {
    case napi_float32_array: return "F32";
    case napi_float64_array: return "F64";
    case napi_bigint64_array: return "I64";
    case napi_int32_array: return "I32";
    case napi_int16_array: return "I16";
    case napi_int8_array: return "I8";
    case napi_uint8_array: return "U8";
    case napi_uint16_array: return "F16";
    default: return nullptr;
  }
}

size_t typed_array_element_size(napi_typedarray_type t) {
  switch (t) {
    case napi_int8_array: case napi_uint8_array: case napi_uint8_clamped_array: return 1;
    case napi_int16_array: case napi_uint16_array: return 2;
    case napi_int32_array: case napi_uint32_array: case napi_float32_array: return 4;
    default: return 8;
  }
}

}  // namespace

at::Tensor tensor_from_js(const Napi::Value& value, const std::string& what) {
  Napi::Env env = value.Env();
  if (!value.IsObject()) throw Napi::TypeError::New(env, "Expected a tensor { data, shape } for " + what);
  Napi::Object obj = value.As<Napi::Object>();
  Napi::Value data = obj.Get("data");
  Napi::Value shape_v = obj.Get("shape");
  if (!data.IsTypedArray()) throw Napi::TypeError::New(env, "Expected a typed array for " + what + ".data");
  if (!shape_v.IsArray()) throw Napi::TypeError::New(env, "Expected an array of integers for " + what + ".shape");
  Napi::TypedArray ta = data.As<Napi::TypedArray>();
  std::string dtype;
  Napi::Value dtype_v = obj.Get("dtype");
  if (dtype_v.IsString()) {
    dtype = dtype_v.As<Napi::String>().Utf8Value();
  } else {
    const char* d = default_dtype(ta.TypedArrayType());
    if (!d) throw Napi::TypeError::New(env, "Unsupported typed array type for " + what + ".data");
    dtype = d;
  }
  size_t esize = dtype_size(dtype);
  if (esize == 0) throw Napi::TypeError::New(env, "Unknown dtype \"" + dtype + "\" for " + what);
  if (typed_array_element_size(ta.TypedArrayType()) != esize)
    throw Napi::TypeError::New(env, "The typed array of " + what + " does not match its dtype " + dtype);
  Napi::Array shape_a = shape_v.As<Napi::Array>();
  std::vector<int64_t> shape;
  int64_t numel = 1;
  for (uint32_t i = 0; i < shape_a.Length(); ++i) {
    Napi::Value d = shape_a.Get(i);
    double v = d.IsNumber() ? d.As<Napi::Number>().DoubleValue() : -1;
    if (!(v >= 0) || v != static_cast<double>(static_cast<int64_t>(v)))
      throw Napi::TypeError::New(env, "Expected non-negative integers in " + what + ".shape");
    shape.push_back(static_cast<int64_t>(v));
    numel *= shape.back();
  }
  if (static_cast<size_t>(numel) != ta.ElementLength())
    throw Napi::RangeError::New(env, what + ": shape holds " + std::to_string(numel) + " elements but data has " +
                                         std::to_string(ta.ElementLength()));
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(scalar_type_from_dtype(dtype)));
  if (numel) {
    const uint8_t* src = static_cast<const uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
    std::memcpy(t.data_ptr(), src, numel * esize);
  }
  return t;
}

Napi::Object tensor_to_js(Napi::Env env, const at::Tensor& tensor) {
  at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
  std::string dtype = dtype_from_scalar_type(t.scalar_type());
  size_t n = static_cast<size_t>(t.numel());
  size_t nbytes = n * t.element_size();
  Napi::ArrayBuffer buf = Napi::ArrayBuffer::New(env, nbytes);
  if (nbytes) std::memcpy(buf.Data(), t.data_ptr(), nbytes);
  Napi::Value data;
  switch (t.scalar_type()) {
    case at::kFloat: data = Napi::Float32Array::New(env, n, buf, 0); break;
    case at::kDouble: data = Napi::Float64Array::New(env, n, buf, 0); break;
    case at::kLong: data = Napi::BigInt64Array::New(env, n, buf, 0); break;
    case at::kInt: data = Napi::Int32Array::New(env, n, buf, 0); break;
    case at::kShort: data = Napi::Int16Array::New(env, n, buf, 0); break;
    case at::kChar: data = Napi::Int8Array::New(env, n, buf, 0); break;
    case at::kHalf: case at::kBFloat16: data = Napi::Uint16Array::New(env, n, buf, 0); break;
    default: data = Napi::Uint8Array::New(env, n, buf, 0); break;  // U8, BOOL
  }
  Napi::Array shape = Napi::Array::New(env, t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) shape.Set(static_cast<uint32_t>(i), Napi::Number::New(env, static_cast<double>(t.size(i))));
  Napi::Object out = Napi::Object::New(env);
  out.Set("dtype", dtype);
  out.Set("shape", shape);
  out.Set("data", data);
  return out;
}

}  // namespace si
