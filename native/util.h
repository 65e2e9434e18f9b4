// Small helpers shared by the native files.
#pragma once

#include <c10/util/ArrayRef.h>

#include <string>

namespace si {

// "[1, 3, 64, 64]": how every error message shows a shape.
inline std::string shape_str(c10::IntArrayRef s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

}  // namespace si
