// Read one float32 (or float16, widened to float32) initializer out of an ONNX file without protobuf: a small wire-format walker over
// ModelProto.graph (7) -> GraphProto.initializer (5) -> TensorProto {dims 1, data_type 2, float_data 4, name 8,
// raw_data 9, external_data 13, data_location 14}; external data is read from its file by offset and length.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sdcpp {

struct Initializer {
  std::vector<int64_t> dims;
  std::string bytes;  // float32 little-endian (a float16 tensor widened exactly)
  std::string stored_dtype = "float32";  // how the file stores it: "float32" or "float16"
};

// Error(bundle) naming the file when it is not ONNX, has no such initializer, the tensor is not float32 or
// float16, or its bytes do not fill its shape.
Initializer read_float_initializer(const std::string& onnx_path, const std::string& name);

}  // namespace sdcpp
