#include "safetensors.h"
#include "util.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <random>

#include "json.h"

namespace si {

namespace {

// The reference implementation (safetensors' MAX_HEADER_SIZE) refuses headers over 100,000,000 bytes;
// real SD checkpoints have ~200 KB.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DTypeEntry {
  const char* name;
  at::ScalarType type;
  size_t size;
};
const DTypeEntry kDTypes[] = {
    {"F64", at::kDouble, 8}, {"F32", at::kFloat, 4}, {"F16", at::kHalf, 2},  {"BF16", at::kBFloat16, 2},
    {"I64", at::kLong, 8},   {"I32", at::kInt, 4},   {"I16", at::kShort, 2}, {"I8", at::kChar, 1},
    {"U8", at::kByte, 1},    {"BOOL", at::kBool, 1},
};

// The header's compact JSON array, as the reference writer emits it: "[2,3]".
std::string json_shape(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

size_t dtype_size(const std::string& dtype) {
  for (const auto& e : kDTypes)
    if (dtype == e.name) return e.size;
  return 0;
}

at::ScalarType scalar_type_from_dtype(const std::string& dtype) {
  for (const auto& e : kDTypes)
    if (dtype == e.name) return e.type;
  throw std::invalid_argument("unknown safetensors dtype " + json_quote(dtype));
}

std::string dtype_from_scalar_type(at::ScalarType t) {
  for (const auto& e : kDTypes)
    if (t == e.type) return e.name;
  throw std::invalid_argument(std::string("tensor dtype ") + c10::toString(t) + " has no safetensors equivalent");
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  auto fail = [&](const std::string& what) -> void { throw SafetensorsError(path + ": " + what); };
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;

  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    fail(std::string("cannot stat: ") + std::strerror(e));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    fail("is a directory, expected a .safetensors file");
  }
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size == 0) {
    ::close(fd);
    fail("empty file (0 bytes), expected a safetensors header");
  }
  void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);
  if (map == MAP_FAILED) fail(std::string("cannot map file: ") + std::strerror(map_errno));
  f->map_ = map;
  f->map_size_ = size;
  const uint8_t* base = static_cast<const uint8_t*>(map);

  // 1. header length
  if (size < 8) fail("truncated file: " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | base[i];
  if (n > kMaxHeaderBytes)
    fail("header length " + std::to_string(n) + " exceeds the limit of " + std::to_string(kMaxHeaderBytes) + " bytes (not a safetensors file?)");
  if (n > size - 8)
    fail("header length " + std::to_string(n) + " goes beyond the end of the file (" + std::to_string(size) + " bytes): truncated file?");
  if (n == 0) fail("header is empty (length 0), expected a JSON object");

  // 2. header JSON
  JsonValue header;
  try {
    header = parse_json(reinterpret_cast<const char*>(base + 8), n);
  } catch (const JsonError& e) {
    fail(std::string("invalid JSON header: ") + e.what());
  }
  if (header.kind != JsonValue::Object) fail(std::string("header is a JSON ") + header.kind_name() + ", expected an object");

  // 3. entries
  const uint64_t data_size = size - 8 - n;
  for (const auto& [key, v] : header.fields) {
    if (key == "__metadata__") {
      if (v.kind != JsonValue::Object) fail(std::string("__metadata__ is a JSON ") + v.kind_name() + ", expected an object of strings");
      for (const auto& [mk, mv] : v.fields) {
        if (mv.kind != JsonValue::String)
          fail("__metadata__ key " + json_quote(mk) + " is a JSON " + mv.kind_name() + ", expected a string");
        f->metadata_[mk] = mv.text;
      }
      continue;
    }
    const std::string where = "tensor " + json_quote(key);
    if (v.kind != JsonValue::Object) fail(where + ": entry is a JSON " + v.kind_name() + ", expected an object with dtype, shape and data_offsets");
    const JsonValue *dtype = nullptr, *shape = nullptr, *offsets = nullptr;
    for (const auto& [fk, fv] : v.fields) {
      if (fk == "dtype") dtype = &fv;
      else if (fk == "shape") shape = &fv;
      else if (fk == "data_offsets") offsets = &fv;
    }
    if (!dtype || !shape || !offsets) fail(where + ": entry lacks " + (!dtype ? "dtype" : !shape ? "shape" : "data_offsets"));
    TensorInfo t;
    t.name = key;
    if (dtype->kind != JsonValue::String) fail(where + ": dtype is a JSON " + dtype->kind_name() + ", expected a string");
    t.dtype = dtype->text;
    size_t esize = dtype_size(t.dtype);
    if (esize == 0)
      fail(where + ": unknown dtype " + json_quote(t.dtype) + " (expected one of F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
    if (shape->kind != JsonValue::Array) fail(where + ": shape is a JSON " + shape->kind_name() + ", expected an array of non-negative integers");
    unsigned long long numel = 1;
    bool overflow = false;
    for (const auto& d : shape->items) {
      unsigned long long dim = 0;
      if (!d.as_uint64(&dim))
        fail(where + ": shape entry " + (d.kind == JsonValue::Number ? d.text : std::string(d.kind_name())) +
             " is not a non-negative integer");
      t.shape.push_back(static_cast<int64_t>(dim));
      if (dim != 0 && numel > UINT64_MAX / dim) overflow = true;
      numel *= dim;
    }
    if (offsets->kind != JsonValue::Array || offsets->items.size() != 2)
      fail(where + ": data_offsets must be an array of two integers [begin, end]");
    unsigned long long b = 0, e = 0;
    if (!offsets->items[0].as_uint64(&b) || !offsets->items[1].as_uint64(&e))
      fail(where + ": data_offsets [" + offsets->items[0].text + ", " + offsets->items[1].text + "] are not non-negative integers");
    if (e < b) fail(where + ": data_offsets end " + std::to_string(e) + " is before begin " + std::to_string(b));
    t.begin = b;
    t.end = e;
    if (overflow || numel > UINT64_MAX / esize || numel * esize != e - b)
      fail(where + ": shape " + shape_str(t.shape) + " of " + t.dtype + " needs " + (overflow ? std::string("too many") : std::to_string(numel * esize)) +
           " bytes but data_offsets span " + std::to_string(e - b));
    if (e > data_size)
      fail(where + ": data_offsets [" + std::to_string(b) + ", " + std::to_string(e) + "] go beyond the data section (" +
           std::to_string(data_size) + " bytes): truncated file?");
    f->index_[key] = f->tensors_.size();
    f->tensors_.push_back(std::move(t));
  }

  // 4. the data section is covered exactly once, with no gaps (as the reference implementation checks)
  std::vector<const TensorInfo*> by_offset;
  for (const auto& t : f->tensors_) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t cursor = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo* t : by_offset) {
    if (t->begin < cursor)
      fail("tensor " + json_quote(t->name) + ": data_offsets [" + std::to_string(t->begin) + ", " + std::to_string(t->end) +
           "] overlap tensor " + json_quote(prev->name));
    if (t->begin > cursor)
      fail("tensor " + json_quote(t->name) + ": data is not contiguous, " + std::to_string(t->begin - cursor) + " unused bytes before it");
    cursor = t->end;
    prev = t;
  }
  if (cursor != data_size)
    fail("data section has " + std::to_string(data_size - cursor) + " bytes after the last tensor (not contiguous)");

  f->data_ = base + 8 + n;
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) munmap(map_, map_size_);
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw SafetensorsError(path_ + ": no tensor named " + json_quote(name));
  return tensors_[it->second];
}

at::Tensor SafetensorsFile::load(const std::string& name) const {
  const TensorInfo& t = info(name);
  at::Tensor out = at::empty(t.shape, at::TensorOptions().dtype(scalar_type_from_dtype(t.dtype)));
  // memcpy rather than from_blob: offsets in the file need not be aligned to the element size.
  if (t.end > t.begin) std::memcpy(out.data_ptr(), data_ + t.begin, t.end - t.begin);
  return out;
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<std::string, at::Tensor>> sorted;
  for (const auto& [name, t] : tensors) {
    if (name.empty()) throw SafetensorsError(path + ": tensor names must not be empty");
    if (name == "__metadata__") throw SafetensorsError(path + ": \"__metadata__\" is reserved and cannot name a tensor");
    sorted.emplace_back(name, t.to(at::kCPU).contiguous());
  }
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (size_t i = 1; i < sorted.size(); ++i)
    if (sorted[i].first == sorted[i - 1].first) throw SafetensorsError(path + ": duplicate tensor name " + json_quote(sorted[i].first));

  // 1. header: __metadata__ first, then tensors in sorted order (what the reference writer does)
  std::string h = "{";
  bool first = true;
  if (!metadata.empty()) {
    h += "\"__metadata__\":{";
    bool mfirst = true;
    for (const auto& [k, v] : metadata) {
      h += (mfirst ? "" : ",") + json_quote(k) + ":" + json_quote(v);
      mfirst = false;
    }
    h += "}";
    first = false;
  }
  uint64_t offset = 0;
  for (const auto& [name, t] : sorted) {
    std::string dtype;
    try {
      dtype = dtype_from_scalar_type(t.scalar_type());
    } catch (const std::invalid_argument& e) {
      throw SafetensorsError(path + ": tensor " + json_quote(name) + ": " + e.what());
    }
    uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    h += (first ? "" : ",") + json_quote(name) + ":{\"dtype\":\"" + dtype + "\",\"shape\":" + json_shape(shape) +
         ",\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + nbytes) + "]}";
    first = false;
    offset += nbytes;
  }
  h += "}";
  while (h.size() % 8 != 0) h += ' ';  // keeps the data section 8-byte aligned

  // 2. write to a temporary file next to the target, then rename: readers never see half a file
  std::random_device rd;
  std::string tmp = path + ".tmp-" + std::to_string(getpid()) + "-" + std::to_string(rd());
  FILE* fp = std::fopen(tmp.c_str(), "wb");
  if (!fp) throw SafetensorsError(path + ": cannot write: " + std::strerror(errno));
  bool ok = true;
  uint8_t len[8];
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  ok = ok && std::fwrite(len, 1, 8, fp) == 8;
  ok = ok && std::fwrite(h.data(), 1, h.size(), fp) == h.size();
  for (const auto& [name, t] : sorted) {
    size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
    if (nbytes) ok = ok && std::fwrite(t.data_ptr(), 1, nbytes, fp) == nbytes;
  }
  ok = (std::fflush(fp) == 0) && ok;
  int saved = errno;
  ok = (std::fclose(fp) == 0) && ok;
  if (!ok) {
    std::remove(tmp.c_str());
    throw SafetensorsError(path + ": write failed: " + std::strerror(saved));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    saved = errno;
    std::remove(tmp.c_str());
    throw SafetensorsError(path + ": cannot move the finished file into place: " + std::strerror(saved));
  }
}

}  // namespace si
