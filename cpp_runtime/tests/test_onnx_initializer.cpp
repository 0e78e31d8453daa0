// The ONNX initializer reader (src/onnx_initializer.cpp) on hand-encoded ModelProto files: every storage form a
// TensorProto can use (raw_data, packed and loose float_data, float16 raw_data, external data) and its refusals.
// The files are written byte by byte here from the protobuf wire format, independently of the reader.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "../src/onnx_initializer.hpp"
#include "safe_denoiser_cpp/errors.hpp"

using namespace sdcpp;

namespace {
std::string temp_dir() {
  char tmpl[] = "/tmp/sdcpp-onnx-XXXXXX";
  const char* dir = mkdtemp(tmpl);
  if (dir == nullptr) throw std::runtime_error("mkdtemp failed");
  return dir;
}

std::string varint(uint64_t v) {
  std::string out;
  for (; v >= 0x80; v >>= 7) out += static_cast<char>((v & 0x7f) | 0x80);
  return out + static_cast<char>(v);
}
std::string tag(int field, int wire) { return varint(static_cast<uint64_t>(field) << 3 | static_cast<uint64_t>(wire)); }
std::string field_varint(int field, uint64_t v) { return tag(field, 0) + varint(v); }
std::string field_bytes(int field, const std::string& payload) {
  return tag(field, 2) + varint(payload.size()) + payload;
}
std::string le32(uint32_t bits) {
  std::string out;
  for (int k = 0; k < 4; ++k) out += static_cast<char>((bits >> (8 * k)) & 0xffu);
  return out;
}
std::string float_bytes(const std::vector<float>& values) {
  std::string out;
  for (const float v : values) {
    uint32_t bits = 0;
    std::memcpy(&bits, &v, 4);
    out += le32(bits);
  }
  return out;
}
std::string entry(const std::string& key, const std::string& value) {
  return field_bytes(13, field_bytes(1, key) + field_bytes(2, value));
}

// ModelProto {ir_version 1, graph 7 {name 2, initializer 5...}}, with an unrelated initializer first.
std::string model(const std::string& tensor) {
  const std::string other = field_varint(1, 1) + field_varint(2, 1) + field_bytes(8, "other") +
                            field_bytes(9, float_bytes({9.f}));
  return field_varint(1, 8) + field_bytes(7, field_bytes(2, "g") + field_bytes(5, other) + field_bytes(5, tensor));
}

std::string write_model(const std::string& dir, const std::string& name, const std::string& tensor) {
  const std::string path = dir + "/" + name;
  std::ofstream(path, std::ios::binary) << model(tensor);
  return path;
}

std::vector<float> floats_of(const Initializer& init) {
  std::vector<float> out(init.bytes.size() / 4);
  std::memcpy(out.data(), init.bytes.data(), out.size() * 4);
  return out;
}

const std::vector<float> kValues = {1.f, -2.5f, 0.125f, 3.f, -0.f, 1e-3f};
constexpr int kFloat = 1, kInt64 = 7, kFloat16 = 10;
}  // namespace

TEST(OnnxInitializer, ReadsRawPackedAndLooseFloats) {
  const std::string dir = temp_dir();
  const std::string dims = field_varint(1, 2) + field_varint(1, 3);
  const std::string raw = write_model(dir, "raw.onnx", dims + field_varint(2, kFloat) + field_bytes(8, "bank") +
                                                           field_bytes(9, float_bytes(kValues)));
  std::string loose_floats;
  for (const float v : kValues) loose_floats += tag(4, 5) + float_bytes({v});
  const std::string packed_dims = field_bytes(1, varint(2) + varint(3));
  const std::string packed = write_model(
      dir, "packed.onnx", packed_dims + field_varint(2, kFloat) + field_bytes(4, float_bytes(kValues)) + field_bytes(8, "bank"));
  const std::string loose =
      write_model(dir, "loose.onnx", dims + field_varint(2, kFloat) + loose_floats + field_bytes(8, "bank"));
  for (const auto& path : {raw, packed, loose}) {
    const Initializer init = read_float_initializer(path, "bank");
    EXPECT_EQ(init.dims, (std::vector<int64_t>{2, 3})) << path;
    EXPECT_EQ(init.stored_dtype, "float32") << path;
    EXPECT_EQ(floats_of(init), kValues) << path;
  }
  EXPECT_EQ(floats_of(read_float_initializer(raw, "other")), std::vector<float>{9.f});
}

TEST(OnnxInitializer, WidensFloat16Exactly) {
  // binary16 bit patterns and their exact values: normals, a subnormal (2^-24), the largest finite, infinity.
  const std::vector<uint16_t> half = {0x3c00, 0xc000, 0x3800, 0x0001, 0x7bff, 0xfc00};
  const std::vector<float> want = {1.f, -2.f, 0.5f, 5.9604644775390625e-08f, 65504.f, -INFINITY};
  std::string bytes;
  for (const uint16_t h : half) bytes += std::string{static_cast<char>(h & 0xff), static_cast<char>(h >> 8)};
  const std::string dir = temp_dir();
  const std::string path = write_model(dir, "half.onnx", field_varint(1, 6) + field_varint(2, kFloat16) +
                                                            field_bytes(8, "bank") + field_bytes(9, bytes));
  const Initializer init = read_float_initializer(path, "bank");
  EXPECT_EQ(init.stored_dtype, "float16");
  EXPECT_EQ(floats_of(init), want);
}

TEST(OnnxInitializer, ReadsExternalDataByOffsetAndLength) {
  const std::string dir = temp_dir();
  std::ofstream(dir + "/weights.bin", std::ios::binary) << std::string(8, 'x') << float_bytes(kValues) << "tail";
  const std::string head = field_varint(1, 6) + field_varint(2, kFloat) + field_bytes(8, "bank");
  const std::string with_length = entry("location", "weights.bin") + entry("offset", "8") + entry("length", "24");
  const std::string path = write_model(dir, "ext.onnx", head + with_length + field_varint(14, 1));
  EXPECT_EQ(floats_of(read_float_initializer(path, "bank")), kValues);
  // Without a length the data runs to the end of the file: here 4 bytes too many for the shape.
  const std::string to_end = write_model(
      dir, "to_end.onnx", head + entry("location", "weights.bin") + entry("offset", "8") + field_varint(14, 1));
  EXPECT_THROW(read_float_initializer(to_end, "bank"), Error);
  const std::string escape = write_model(dir, "escape.onnx", head + entry("location", "../weights.bin") +
                                                                entry("length", "24") + field_varint(14, 1));
  try {
    read_float_initializer(escape, "bank");
    FAIL() << "a location outside the bundle was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("invalid external data location"), std::string::npos) << e.what();
  }
}

TEST(OnnxInitializer, RefusesWrongTypeShapeNameAndFile) {
  const std::string dir = temp_dir();
  const auto message = [](const std::string& path, const std::string& name) {
    try {
      read_float_initializer(path, name);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::bundle);
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string ints = write_model(
      dir, "ints.onnx", field_varint(1, 1) + field_varint(2, kInt64) + field_bytes(8, "bank") + field_bytes(9, std::string(8, '\0')));
  EXPECT_NE(message(ints, "bank").find("is not float32 or float16 (data_type 7)"), std::string::npos);
  const std::string short_data = write_model(
      dir, "short.onnx", field_varint(1, 7) + field_varint(2, kFloat) + field_bytes(8, "bank") + field_bytes(9, float_bytes(kValues)));
  EXPECT_NE(message(short_data, "bank").find("holds 24 bytes, its shape needs 28"), std::string::npos);
  EXPECT_NE(message(short_data, "missing").find("has no initializer named 'missing'"), std::string::npos);
  const std::string half_no_raw =
      write_model(dir, "half_no_raw.onnx", field_varint(1, 1) + field_varint(2, kFloat16) + field_bytes(8, "bank"));
  EXPECT_NE(message(half_no_raw, "bank").find("has no raw_data"), std::string::npos);
  const std::string truncated = dir + "/truncated.onnx";
  const std::string whole = model(field_varint(2, kFloat) + field_bytes(8, "bank"));
  std::ofstream(truncated, std::ios::binary) << whole.substr(0, whole.size() - 3);
  EXPECT_NE(message(truncated, "bank").find("is not a readable ONNX file"), std::string::npos);
  EXPECT_NE(message(dir + "/absent.onnx", "bank").find("cannot open"), std::string::npos);
}

// Issue 26: crafted lengths made the reader's position wrap around 2^64 and loop forever (a 27-byte file whose hash
// the manifest lists). Every length is now checked against its enclosing message before it moves a position.
namespace {
std::string refusal(const std::string& dir, const std::string& name, const std::string& bytes) {
  const std::string path = dir + "/" + name;
  std::ofstream(path, std::ios::binary) << bytes;
  try {
    read_float_initializer(path, "bank");
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bundle) << name;
    return e.what();
  }
  return "no error";
}
// A graph (field 7) holding `graph`, its declared length exact.
std::string with_graph(const std::string& graph) { return field_varint(1, 8) + field_bytes(7, graph); }
constexpr uint64_t kMax = UINT64_MAX;
}  // namespace

TEST(OnnxInitializer, RefusesLengthsThatWrapOrRunPastTheirMessage) {
  const std::string dir = temp_dir();
  const std::string past = "runs past its message";
  // An initializer whose length wraps the position backwards (the endless loop of the 27-byte file).
  // kMax - 10: the position wraps back onto the initializer's own tag (11 bytes with its 10-byte length).
  for (const uint64_t n : {kMax, kMax - 1, kMax - 10, kMax - 20, uint64_t{1} << 63}) {
    const std::string wrap = with_graph(tag(5, 2) + varint(n) + field_bytes(8, "bank"));
    EXPECT_LE(wrap.size(), 40u);
    EXPECT_NE(refusal(dir, "wrap.onnx", wrap).find(past), std::string::npos) << n;
    // The same lengths on the graph itself, on a skipped field, on raw_data and on an external_data entry.
    EXPECT_NE(refusal(dir, "graph.onnx", field_varint(1, 8) + tag(7, 2) + varint(n)).find("past"), std::string::npos);
    EXPECT_NE(refusal(dir, "skip.onnx", with_graph(tag(3, 2) + varint(n) + "x")).find(past), std::string::npos);
    const std::string head = field_varint(1, 1) + field_varint(2, kFloat) + field_bytes(8, "bank");
    EXPECT_NE(refusal(dir, "raw.onnx", with_graph(field_bytes(5, head + tag(9, 2) + varint(n)))).find(past),
              std::string::npos);
    EXPECT_NE(refusal(dir, "dims.onnx", with_graph(field_bytes(5, tag(1, 2) + varint(n) + head))).find(past),
              std::string::npos);
    EXPECT_NE(refusal(dir, "entry.onnx", with_graph(field_bytes(5, head + tag(13, 2) + varint(n)))).find(past),
              std::string::npos);
  }
  // A length just one byte past the end of its enclosing message (not of the file).
  const std::string inner = field_bytes(8, "bank");
  const std::string one_past = field_varint(1, 8) + tag(7, 2) + varint(inner.size() + 2) + tag(5, 2) +
                               varint(inner.size() + 1) + inner + "xx";
  EXPECT_NE(refusal(dir, "one_past.onnx", one_past).find(past), std::string::npos);
  // Fixed-width fields cut short by their message.
  EXPECT_NE(refusal(dir, "fixed64.onnx", with_graph(tag(3, 1) + "1234")).find(past), std::string::npos);
  EXPECT_NE(refusal(dir, "fixed32.onnx", with_graph(field_bytes(5, tag(4, 5) + "12"))).find(past), std::string::npos);
}

TEST(OnnxInitializer, RefusesOverlongVarintsHugeShapesAndBadExternalNumbers) {
  const std::string dir = temp_dir();
  // 10-byte varint whose last byte carries bits past 2^64; an 11-byte varint.
  EXPECT_NE(refusal(dir, "v10.onnx", "\x08" + std::string(9, '\xff') + "\x02").find("overflows 64 bits"),
            std::string::npos);
  EXPECT_NE(refusal(dir, "v11.onnx", "\x08" + std::string(10, '\x80') + "\x01").find("not a readable ONNX file"),
            std::string::npos);
  const auto tensor = [](const std::string& dims) {
    return with_graph(field_bytes(5, dims + field_varint(2, kFloat) + field_bytes(8, "bank") + field_bytes(9, "")));
  };
  // Dims whose product wraps to 0 bytes (2^62 * 4 floats * 4 bytes) must not match the empty raw_data.
  EXPECT_NE(refusal(dir, "wrap_dims.onnx", tensor(field_varint(1, uint64_t{1} << 62) + field_varint(1, 4)))
                .find("shape too large"),
            std::string::npos);
  EXPECT_NE(refusal(dir, "neg_dim.onnx", tensor(field_varint(1, static_cast<uint64_t>(-3)))).find("negative dimension"),
            std::string::npos);
  std::ofstream(dir + "/weights.bin", std::ios::binary) << float_bytes(kValues);
  const std::string head = field_varint(1, 6) + field_varint(2, kFloat) + field_bytes(8, "bank");
  for (const auto& [key, value] : std::vector<std::pair<std::string, std::string>>{
           {"offset", "-1"}, {"offset", " 8"}, {"length", "18446744073709551616"}, {"length", "24x"}, {"offset", ""}}) {
    const std::string ext = head + entry("location", "weights.bin") + entry(key, value) + field_varint(14, 1);
    EXPECT_NE(refusal(dir, "ext.onnx", with_graph(field_bytes(5, ext))).find("is not a decimal number"),
              std::string::npos) << key << "=" << value;
  }
  // An offset and length each inside the file whose sum is not.
  const std::string sum = head + entry("location", "weights.bin") + entry("offset", "16") +
                          entry("length", "18446744073709551600") + field_varint(14, 1);
  EXPECT_NE(refusal(dir, "sum.onnx", with_graph(field_bytes(5, sum))).find("past the end of the file"),
            std::string::npos);
}
