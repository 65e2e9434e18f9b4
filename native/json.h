// A small strict JSON reader for safetensors headers. We need what general libraries hide:
// duplicate keys are an error, and numbers keep their source text so "-1" or "2.5" in a shape
// can be reported as written.
#pragma once

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace si {

struct JsonValue {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool boolean = false;
  std::string text;  // String: decoded value; Number: source text
  std::vector<JsonValue> items;                           // Array
  std::vector<std::pair<std::string, JsonValue>> fields;  // Object, in source order

  const char* kind_name() const;
  // Number that is a non-negative integer fitting in int64/uint64; false otherwise.
  bool as_uint64(unsigned long long* out) const;
};

class JsonError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Throws JsonError("... at byte N") on invalid input or a duplicate object key.
JsonValue parse_json(const char* begin, size_t size, int max_depth = 64);

std::string json_quote(const std::string& s);

}  // namespace si
