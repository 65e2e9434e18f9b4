#include "json.h"

#include <cstring>
#include <set>

namespace si {

const char* JsonValue::kind_name() const {
  switch (kind) {
    case Null: return "null";
    case Bool: return "boolean";
    case Number: return "number";
    case String: return "string";
    case Array: return "array";
    case Object: return "object";
  }
  return "?";
}

bool JsonValue::as_uint64(unsigned long long* out) const {
  if (kind != Number || text.empty()) return false;
  unsigned long long v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return false;  // rejects '-', '.', 'e'
    unsigned long long next = v * 10 + static_cast<unsigned>(c - '0');
    if (next / 10 != v) return false;  // overflow
    v = next;
  }
  if (v > static_cast<unsigned long long>(INT64_MAX)) return false;
  *out = v;
  return true;
}

namespace {

class Parser {
 public:
  Parser(const char* p, size_t n, int max_depth) : s_(p), n_(n), max_depth_(max_depth) {}

  JsonValue parse_document() {
    JsonValue v = value(0);
    skip_ws();
    if (i_ != n_) fail("unexpected data after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw JsonError(what + " at byte " + std::to_string(i_));
  }
  void skip_ws() {
    while (i_ < n_ && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  bool consume(char c) {
    skip_ws();
    if (i_ < n_ && s_[i_] == c) { ++i_; return true; }
    return false;
  }
  void expect(char c) {
    if (!consume(c)) fail(std::string("expected '") + c + "'");
  }

  JsonValue value(int depth) {
    if (depth > max_depth_) fail("nesting deeper than " + std::to_string(max_depth_));
    skip_ws();
    if (i_ >= n_) fail("unexpected end of JSON");
    char c = s_[i_];
    JsonValue v;
    if (c == '{') {
      ++i_;
      v.kind = JsonValue::Object;
      std::set<std::string> seen;
      if (consume('}')) return v;
      do {
        skip_ws();
        if (i_ >= n_ || s_[i_] != '"') fail("expected a string key");
        std::string key = string_body();
        if (!seen.insert(key).second) fail("duplicate key " + json_quote(key));
        expect(':');
        v.fields.emplace_back(key, value(depth + 1));
      } while (consume(','));
      expect('}');
    } else if (c == '[') {
      ++i_;
      v.kind = JsonValue::Array;
      if (consume(']')) return v;
      do {
        v.items.push_back(value(depth + 1));
      } while (consume(','));
      expect(']');
    } else if (c == '"') {
      v.kind = JsonValue::String;
      v.text = string_body();
    } else if (c == 't' && literal("true")) {
      v.kind = JsonValue::Bool;
      v.boolean = true;
    } else if (c == 'f' && literal("false")) {
      v.kind = JsonValue::Bool;
    } else if (c == 'n' && literal("null")) {
      v.kind = JsonValue::Null;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      v.kind = JsonValue::Number;
      size_t start = i_;
      if (s_[i_] == '-') ++i_;
      if (i_ >= n_ || !isdigit(static_cast<unsigned char>(s_[i_]))) fail("invalid number");
      if (s_[i_] == '0' && i_ + 1 < n_ && isdigit(static_cast<unsigned char>(s_[i_ + 1]))) fail("invalid number (leading zero)");
      while (i_ < n_ && isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
      if (i_ < n_ && s_[i_] == '.') {
        ++i_;
        if (i_ >= n_ || !isdigit(static_cast<unsigned char>(s_[i_]))) fail("invalid number");
        while (i_ < n_ && isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
      }
      if (i_ < n_ && (s_[i_] == 'e' || s_[i_] == 'E')) {
        ++i_;
        if (i_ < n_ && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
        if (i_ >= n_ || !isdigit(static_cast<unsigned char>(s_[i_]))) fail("invalid number");
        while (i_ < n_ && isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
      }
      v.text.assign(s_ + start, i_ - start);
    } else {
      fail(std::string("unexpected character '") + (isprint(static_cast<unsigned char>(c)) ? std::string(1, c) : "?") + "'");
    }
    return v;
  }

  bool literal(const char* word) {
    size_t len = std::strlen(word);
    if (i_ + len <= n_ && std::memcmp(s_ + i_, word, len) == 0) { i_ += len; return true; }
    return false;
  }

  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  // Length of the well-formed UTF-8 sequence at i_ (no overlongs, surrogates or code points
  // above U+10FFFF), 0 when it is not one.
  size_t utf8_sequence_length() const {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(s_ + i_);
    size_t avail = n_ - i_;
    unsigned char b = p[0];
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (b >= 0xC2 && b <= 0xDF) len = 2;
    else if (b >= 0xE0 && b <= 0xEF) {
      len = 3;
      if (b == 0xE0) lo = 0xA0;
      if (b == 0xED) hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
      len = 4;
      if (b == 0xF0) lo = 0x90;
      if (b == 0xF4) hi = 0x8F;
    } else {
      return 0;
    }
    if (avail < len || p[1] < lo || p[1] > hi) return 0;
    for (size_t k = 2; k < len; ++k)
      if ((p[k] & 0xC0) != 0x80) return 0;
    return len;
  }

  unsigned hex4() {
    if (i_ + 4 > n_) fail("truncated \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s_[i_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("invalid \\u escape");
    }
    return v;
  }

  std::string string_body() {
    ++i_;  // opening quote
    std::string out;
    while (true) {
      if (i_ >= n_) fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') break;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (static_cast<unsigned char>(c) >= 0x80) {
        // JSON text is UTF-8 (RFC 8259, and the reference reader rejects other headers): copy one
        // well-formed sequence, so names and metadata reach JS unchanged.
        --i_;
        size_t len = utf8_sequence_length();
        if (len == 0) fail("invalid UTF-8 in string");
        out.append(s_ + i_, len);
        i_ += len;
        continue;
      }
      if (c != '\\') { out += c; continue; }
      if (i_ >= n_) fail("unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && i_ + 6 <= n_ && s_[i_] == '\\' && s_[i_ + 1] == 'u') {
            i_ += 2;
            unsigned lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("invalid surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          // a surrogate left over has no UTF-8 encoding
          if (cp >= 0xD800 && cp <= 0xDFFF) fail("lone surrogate in \\u escape");
          append_utf8(out, cp);
          break;
        }
        default: fail("invalid escape");
      }
    }
    return out;
  }

  const char* s_;
  size_t n_;
  int max_depth_;
  size_t i_ = 0;
};

}  // namespace

JsonValue parse_json(const char* begin, size_t size, int max_depth) {
  return Parser(begin, size, max_depth).parse_document();
}

std::string json_quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

}  // namespace si
