// safetensors reading and writing: the only weight format we execute (pickles are never loaded).
// Format: u64 LE header length N, N bytes of JSON header, then the raw little-endian tensor data.
// https://github.com/huggingface/safetensors (format section of its README).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace si {

// Every problem with a file: the message names the file and, where there is one, the key.
class SafetensorsError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct TensorInfo {
  std::string name;
  std::string dtype;            // "F32", "F16", ... as written in the header
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets relative to the start of the data section
};

// A memory-mapped safetensors file. Opening validates the whole header; tensors are read lazily.
class SafetensorsFile {
 public:
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in header order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  const TensorInfo& info(const std::string& name) const;
  const uint8_t* bytes(const TensorInfo& t) const { return data_ + t.begin; }
  // A new CPU tensor (owning its memory) with the file's dtype and shape.
  at::Tensor load(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Tensors are written in sorted key order; the file appears atomically (temp file + rename).
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata);

at::ScalarType scalar_type_from_dtype(const std::string& dtype);  // throws std::invalid_argument
std::string dtype_from_scalar_type(at::ScalarType t);               // throws std::invalid_argument
size_t dtype_size(const std::string& dtype);                        // 0 when unknown

}  // namespace si
