#include "onnx_initializer.hpp"

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <memory>

#include "safe_denoiser_cpp/errors.hpp"

namespace sdcpp {
namespace {
constexpr int kFloat = 1;          // TensorProto.DataType.FLOAT
constexpr int kFloat16 = 10;       // TensorProto.DataType.FLOAT16 (a float16-stored bank, cast inside the graph)
constexpr int kExternal = 1;       // TensorProto.DataLocation.EXTERNAL

// Random-access reads of a file with bounds checks; every failure names the file. Every length and offset from
// the file is checked against its enclosing end before it moves a position: a crafted length near 2^64 must not
// wrap a position backwards (an endless loop) or past the end.
class Reader {
 public:
  explicit Reader(const std::string& path) : path_(path), in_(path, std::ios::binary) {
    if (!in_) throw Error(ErrorKind::bundle, "cannot open '" + path + "'");
    in_.seekg(0, std::ios::end);
    const std::streamoff size = in_.tellg();
    if (size < 0) fail("cannot tell its size");
    size_ = static_cast<uint64_t>(size);
  }
  uint64_t size() const { return size_; }
  std::string read(uint64_t offset, uint64_t n) {
    if (offset > size_ || n > size_ - offset) fail("field runs past the end of the file");
    std::string out(n, '\0');
    in_.seekg(static_cast<std::streamoff>(offset));
    in_.read(out.data(), static_cast<std::streamsize>(n));
    if (!in_) fail("read error");
    return out;
  }
  uint64_t varint(uint64_t& pos, uint64_t end) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos >= end) fail("truncated varint");
      const auto byte = static_cast<unsigned char>(read(pos++, 1)[0]);
      if (shift == 63 && byte > 1) fail("varint overflows 64 bits");
      v |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return v;
    }
    fail("varint too long");
  }
  // pos + n, failing unless pos <= pos + n <= end (checked without computing a wrapped sum).
  uint64_t advance(uint64_t pos, uint64_t n, uint64_t end) const {
    if (pos > end || n > end - pos) fail("a length of " + std::to_string(n) + " runs past its message");
    return pos + n;
  }
  // Skip a field's payload of the given wire type.
  void skip(int wire, uint64_t& pos, uint64_t end) {
    switch (wire) {
      case 0: varint(pos, end); break;
      case 1: pos = advance(pos, 8, end); break;
      case 2: { const uint64_t n = varint(pos, end); pos = advance(pos, n, end); break; }
      case 5: pos = advance(pos, 4, end); break;
      default: fail("unsupported wire type " + std::to_string(wire));
    }
  }
  [[noreturn]] void fail(const std::string& why) const {
    throw Error(ErrorKind::bundle, "'" + path_ + "' is not a readable ONNX file: " + why);
  }

 private:
  std::string path_;
  std::ifstream in_;
  uint64_t size_ = 0;
};

struct Span {
  uint64_t pos = 0, len = 0;
};

// IEEE binary16 -> binary32 bits (exact: every half value is a float value).
uint32_t half_to_float_bits(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1fu) return sign | 0x7f800000u | (mant << 13);  // inf / nan
  if (exp == 0) {
    if (mant == 0) return sign;
    uint32_t e = 113;  // subnormal mant * 2^-24: normalise so that bit 10 is the implicit one
    while (!(mant & 0x400u)) { mant <<= 1; --e; }
    return sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  return sign | ((exp + 112) << 23) | (mant << 13);
}

// Little-endian float16 bytes -> little-endian float32 bytes.
std::string widen_half(const std::string& bytes) {
  std::string out(bytes.size() * 2, '\0');
  for (size_t i = 0; i + 1 < bytes.size(); i += 2) {
    const auto lo = static_cast<uint8_t>(bytes[i]), hi = static_cast<uint8_t>(bytes[i + 1]);
    const uint32_t f = half_to_float_bits(static_cast<uint16_t>(lo | (hi << 8)));
    for (int k = 0; k < 4; ++k) out[2 * i + k] = static_cast<char>((f >> (8 * k)) & 0xffu);
  }
  return out;
}

std::string dir_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

// external_data entries (StringStringEntryProto) that say where an external tensor's bytes lie.
struct ExternalData {
  std::string location;
  uint64_t offset = 0, length = 0;
  bool has_length = false;
};

// The TensorProto fields the reader needs, as found in the file (payloads as spans, read afterwards).
struct TensorFields {
  std::vector<int64_t> dims;
  int data_type = 0, location = 0;
  Span raw, packed_floats;
  std::string loose_floats;
  ExternalData external;
};

// A decimal offset or length of external_data: digits only, within uint64 (std::stoull would take "-1" or " 7").
uint64_t decimal(const Reader& r, const std::string& key, const std::string& text) {
  uint64_t v = 0;
  if (text.empty() || text.size() > 20) r.fail("external_data " + key + " is not a decimal number");
  for (const char c : text) {
    if (c < '0' || c > '9' || v > (UINT64_MAX - static_cast<uint64_t>(c - '0')) / 10) {
      r.fail("external_data " + key + " is not a decimal number below 2^64");
    }
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  return v;
}

// One StringStringEntryProto {key 1, value 2} in [pos, stop) into `external`.
void read_external_entry(Reader& r, uint64_t pos, uint64_t stop, ExternalData& external) {
  std::string key, value;
  while (pos < stop) {
    const uint64_t t = r.varint(pos, stop);
    if ((t & 7) != 2) { r.skip(static_cast<int>(t & 7), pos, stop); continue; }
    const uint64_t len = r.varint(pos, stop);
    const uint64_t next = r.advance(pos, len, stop);
    ((t >> 3) == 1 ? key : value) = r.read(pos, len);
    pos = next;
  }
  if (key == "location") external.location = value;
  if (key == "offset") external.offset = decimal(r, key, value);
  if (key == "length") { external.length = decimal(r, key, value); external.has_length = true; }
}

// Length-delimited payload at pos: its span, with pos moved past it.
Span delimited(Reader& r, uint64_t& pos, uint64_t end) {
  Span span;
  span.len = r.varint(pos, end);
  span.pos = pos;
  pos = r.advance(pos, span.len, end);
  return span;
}

TensorFields read_tensor_fields(Reader& r, uint64_t pos, uint64_t end) {
  TensorFields f;
  while (pos < end) {
    const uint64_t tag = r.varint(pos, end);
    const int field = static_cast<int>(tag >> 3), wire = static_cast<int>(tag & 7);
    if (field == 1 && wire == 0) {
      f.dims.push_back(static_cast<int64_t>(r.varint(pos, end)));
    } else if (field == 1 && wire == 2) {
      const uint64_t n = r.varint(pos, end), stop = r.advance(pos, n, end);
      while (pos < stop) f.dims.push_back(static_cast<int64_t>(r.varint(pos, stop)));
    } else if (field == 2 && wire == 0) {
      f.data_type = static_cast<int>(r.varint(pos, end));
    } else if (field == 4 && wire == 2) {
      f.packed_floats = delimited(r, pos, end);
    } else if (field == 4 && wire == 5) {
      const uint64_t next = r.advance(pos, 4, end);
      f.loose_floats += r.read(pos, 4);
      pos = next;
    } else if (field == 9 && wire == 2) {
      f.raw = delimited(r, pos, end);
    } else if (field == 13 && wire == 2) {
      const Span entry = delimited(r, pos, end);
      read_external_entry(r, entry.pos, entry.pos + entry.len, f.external);
    } else if (field == 14 && wire == 0) {
      f.location = static_cast<int>(r.varint(pos, end));
    } else {
      r.skip(wire, pos, end);
    }
  }
  return f;
}

// The tensor's stored bytes: from its external file, raw_data, packed float_data or loose float_data.
std::string tensor_bytes(Reader& r, const std::string& path, const std::string& name, const TensorFields& f) {
  if (f.location == kExternal) {
    const std::string& where = f.external.location;
    if (where.empty() || where.find("..") != std::string::npos || where[0] == '/') {
      throw Error(ErrorKind::bundle, "initializer '" + name + "' has an invalid external data location");
    }
    Reader data(dir_of(path) + "/" + where);
    return data.read(f.external.offset, f.external.has_length ? f.external.length : data.size() - f.external.offset);
  }
  if (f.raw.len > 0) return r.read(f.raw.pos, f.raw.len);
  if (f.packed_floats.len > 0) return r.read(f.packed_floats.pos, f.packed_floats.len);
  return f.loose_floats;
}

// The product of the dims, refusing negative dims and a byte size past 2^63 (the sum must not wrap to the size held).
uint64_t element_count(const Reader& r, const std::string& name, const std::vector<int64_t>& dims, uint64_t width) {
  uint64_t count = 1;
  for (const auto d : dims) {
    if (d < 0) r.fail("initializer '" + name + "' has a negative dimension " + std::to_string(d));
    if (d != 0 && count > (static_cast<uint64_t>(INT64_MAX) / width) / static_cast<uint64_t>(d)) {
      r.fail("initializer '" + name + "' has a shape too large to hold");
    }
    count *= static_cast<uint64_t>(d);
  }
  return count;
}

Initializer parse_tensor(Reader& r, const std::string& path, uint64_t pos, uint64_t end, const std::string& name) {
  const TensorFields f = read_tensor_fields(r, pos, end);
  if (f.data_type != kFloat && f.data_type != kFloat16) {
    throw Error(ErrorKind::bundle, "initializer '" + name + "' in '" + path + "' is not float32 or float16 (data_type " +
                                       std::to_string(f.data_type) + ")");
  }
  if (f.data_type == kFloat16 && f.location != kExternal && f.raw.len == 0) {
    throw Error(ErrorKind::bundle, "float16 initializer '" + name + "' in '" + path + "' has no raw_data");
  }
  Initializer out;
  out.dims = f.dims;
  out.bytes = tensor_bytes(r, path, name, f);
  const uint64_t width = f.data_type == kFloat16 ? 2 : 4;
  const uint64_t count = element_count(r, name, out.dims, width);
  if (out.bytes.size() != count * width) {
    throw Error(ErrorKind::bundle, "initializer '" + name + "' in '" + path + "' holds " +
                                       std::to_string(out.bytes.size()) + " bytes, its shape needs " +
                                       std::to_string(count * width));
  }
  if (f.data_type == kFloat16) {
    out.bytes = widen_half(out.bytes);
    out.stored_dtype = "float16";
  }
  return out;
}

// Find `name` among the graph's initializers: returns true and fills `out`.
bool find_in_graph(Reader& r, const std::string& path, uint64_t pos, uint64_t end, const std::string& name,
                   Initializer& out) {
  while (pos < end) {
    const uint64_t tag = r.varint(pos, end);
    const int field = static_cast<int>(tag >> 3), wire = static_cast<int>(tag & 7);
    if (field == 5 && wire == 2) {
      const uint64_t n = r.varint(pos, end), start = pos, stop = r.advance(pos, n, end);
      // Protobuf writers emit fields in number order: the name (8) comes before raw_data (9).
      uint64_t p = start;
      std::string tensor_name;
      while (p < stop) {
        const uint64_t t = r.varint(p, stop);
        if ((t >> 3) == 8 && (t & 7) == 2) {
          const uint64_t len = r.varint(p, stop);
          r.advance(p, len, stop);
          tensor_name = r.read(p, len);
          break;
        }
        r.skip(static_cast<int>(t & 7), p, stop);
      }
      if (tensor_name == name) {
        out = parse_tensor(r, path, start, stop, name);
        return true;
      }
      pos = stop;
    } else {
      r.skip(wire, pos, end);
    }
  }
  return false;
}
}  // namespace

Initializer read_float_initializer(const std::string& onnx_path, const std::string& name) {
  Reader r(onnx_path);
  uint64_t pos = 0;
  const uint64_t end = r.size();
  bool saw_graph = false;
  while (pos < end) {
    const uint64_t tag = r.varint(pos, end);
    const int field = static_cast<int>(tag >> 3), wire = static_cast<int>(tag & 7);
    if (field == 0) r.fail("field number 0");
    if (field == 7 && wire == 2) {
      const uint64_t n = r.varint(pos, end);
      r.advance(pos, n, end);
      saw_graph = true;
      Initializer out;
      if (find_in_graph(r, onnx_path, pos, pos + n, name, out)) return out;
      pos += n;
    } else {
      r.skip(wire, pos, end);
    }
  }
  if (!saw_graph) r.fail("no graph");
  throw Error(ErrorKind::bundle, "'" + onnx_path + "' has no initializer named '" + name + "'");
}

}  // namespace sdcpp
