#include "safe_denoiser_cpp/files.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include "safe_denoiser_cpp/errors.hpp"

namespace sdcpp {
namespace {
std::string errno_text() { return std::strerror(errno); }
}  // namespace

namespace {
// Write `data` to a new temporary sibling of `path`; returns its name. Nothing is left behind on failure.
std::string write_temp(const std::string& path, const void* data, size_t size) {
  std::random_device rd;
  const std::string tmp = path + ".tmp-" + std::to_string(getpid()) + "-" + std::to_string(rd());
  const mode_t mask = umask(0);
  umask(mask);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666 & ~mask);
  if (fd < 0) throw Error(ErrorKind::io, "cannot write '" + path + "': " + errno_text());
  const auto* p = static_cast<const char*>(data);
  size_t left = size;
  bool ok = true;
  while (left > 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) { ok = false; break; }
    p += n;
    left -= static_cast<size_t>(n);
  }
  const std::string why = ok ? "" : errno_text();
  // No fsync: like safe_denoiser.files.atomic_write, the rename guarantees whole files to readers, not durability.
  ok = ::close(fd) == 0 && ok;
  if (!ok) {
    const std::string reason = why.empty() ? errno_text() : why;
    ::unlink(tmp.c_str());
    throw Error(ErrorKind::io, "cannot write '" + path + "': " + reason);
  }
  return tmp;
}

std::string parent_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
}
}  // namespace

void atomic_write(const std::string& path, const void* data, size_t size) {
  // A temporary sibling renamed over the target: a reader sees the old file or the whole new one.
  const std::string tmp = write_temp(path, data, size);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string reason = errno_text();
    ::unlink(tmp.c_str());
    throw Error(ErrorKind::io, "cannot write '" + path + "': " + reason);
  }
}

void atomic_write_all(const std::vector<std::pair<std::string, std::string>>& files) {
  // Every temporary first, then the renames: a failed write leaves none of the targets.
  std::vector<std::string> temps;
  size_t renamed = 0;
  try {
    for (const auto& [path, bytes] : files) temps.push_back(write_temp(path, bytes.data(), bytes.size()));
    for (; renamed < files.size(); ++renamed) {
      if (std::rename(temps[renamed].c_str(), files[renamed].first.c_str()) != 0) {
        throw Error(ErrorKind::io, "cannot write '" + files[renamed].first + "': " + errno_text());
      }
    }
  } catch (const Error&) {
    for (size_t i = 0; i < temps.size(); ++i) ::unlink((i < renamed ? files[i].first : temps[i]).c_str());
    throw;
  }
}

void check_output_file(const std::string& path, const std::string& what) {
  const auto slash = path.find_last_of('/');
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  if (base.empty() || base == "." || base == "..") {
    throw Error(ErrorKind::io, what + ": expected a file path, got '" + path + "'");
  }
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    throw Error(ErrorKind::io, what + ": '" + path + "' is a folder, expected a file path");
  }
  const std::string dir = parent_of(path);
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || ::access(dir.c_str(), W_OK) != 0) {
    throw Error(ErrorKind::io, what + ": '" + dir + "' is not a writable folder");
  }
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(ErrorKind::io, "cannot read '" + path + "'");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

NpyArray read_npy_f32(const std::string& path) {
  const std::string bytes = read_file(path);
  const auto bad = [&](const std::string& why) { return Error(ErrorKind::input, "noise file '" + path + "': " + why); };
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) throw bad("not a .npy file");
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0, start = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<size_t>(static_cast<unsigned char>(bytes[9])) << 8);
    start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) throw bad("truncated header");
    for (int i = 0; i < 4; ++i) header_len |= static_cast<size_t>(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
    start = 12;
  } else {
    throw bad("unsupported .npy version " + std::to_string(major));
  }
  if (start + header_len > bytes.size()) throw bad("truncated header");
  const std::string header = bytes.substr(start, header_len);
  const auto field = [&](const std::string& key) {
    const auto k = header.find("'" + key + "'");
    if (k == std::string::npos) throw bad("header has no '" + key + "'");
    return header.substr(header.find(':', k) + 1);
  };
  const std::string descr = field("descr");
  if (descr.find("'<f4'") == std::string::npos) {
    throw bad("dtype must be little-endian float32 ('<f4'), header says " + descr.substr(0, descr.find(',')));
  }
  if (field("fortran_order").find("False") > 1) {
    throw bad("must be C-ordered (fortran_order False)");
  }
  const std::string shape_text = field("shape");
  const auto open = shape_text.find('('), close = shape_text.find(')');
  if (open == std::string::npos || close == std::string::npos) throw bad("unreadable shape");
  NpyArray out;
  std::stringstream dims(shape_text.substr(open + 1, close - open - 1));
  std::string dim;
  size_t count = 1;
  while (std::getline(dims, dim, ',')) {
    if (dim.find_first_not_of(" ") == std::string::npos) continue;
    const long long v = std::stoll(dim);
    if (v < 0) throw bad("negative dimension");
    out.shape.push_back(v);
    count *= static_cast<size_t>(v);
  }
  const size_t data_start = start + header_len;
  if (bytes.size() - data_start != count * 4) {
    throw bad("holds " + std::to_string(bytes.size() - data_start) + " data bytes, shape needs " +
              std::to_string(count * 4));
  }
  out.data.resize(count);
  std::memcpy(out.data.data(), bytes.data() + data_start, count * 4);
  return out;
}

std::string npy_bytes_f32(const std::vector<int64_t>& shape, const float* data) {
  std::string dims;
  size_t count = 1;
  for (const auto d : shape) {
    dims += std::to_string(d) + ", ";
    count *= static_cast<size_t>(d);
  }
  if (!shape.empty()) dims.resize(dims.size() - (shape.size() > 1 ? 2 : 1));  // "(2, 3)" but "(2,)"
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::string out = "\x93NUMPY\x01";
  out += '\0';
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>(header.size() >> 8);
  out += header;
  out.append(reinterpret_cast<const char*>(data), count * 4);
  return out;
}

}  // namespace sdcpp
