// Files: atomic writes (temporary sibling + rename: readers never see half a file) and .npy I/O.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace sdcpp {

void atomic_write(const std::string& path, const void* data, size_t size);
inline void atomic_write(const std::string& path, const std::string& text) { atomic_write(path, text.data(), text.size()); }
// Several (path, bytes) written together: every temporary is written before any is renamed over its target, so a
// failed write (disk full, a folder in the way) leaves none of them; Error(io) naming the path.
void atomic_write_all(const std::vector<std::pair<std::string, std::string>>& files);
// Fail early (before a slow generation) unless `path` names a file that can be written: not empty, not a folder,
// in a writable folder. Error(io) naming `what` (the flag) and the path.
void check_output_file(const std::string& path, const std::string& what);
std::string read_file(const std::string& path);

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;
};
// A little-endian float32 C-order .npy (version 1-3); Error(input) naming the file and what is wrong otherwise.
NpyArray read_npy_f32(const std::string& path);
std::string npy_bytes_f32(const std::vector<int64_t>& shape, const float* data);

}  // namespace sdcpp
