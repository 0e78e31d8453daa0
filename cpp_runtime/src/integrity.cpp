#include "safe_denoiser_cpp/integrity.hpp"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <vector>

#include "safe_denoiser_cpp/errors.hpp"

namespace sdcpp {
namespace {
constexpr size_t kChunk = size_t{1} << 20;

using DigestContext = std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)>;

DigestContext sha256_context() {
  DigestContext ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw Error(ErrorKind::runtime, "sha256: init failed");
  return ctx;
}

std::string hex_digest(EVP_MD_CTX* ctx) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(ctx, digest, &len) != 1) throw Error(ErrorKind::runtime, "sha256: final failed");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}

// Closes the descriptor on every path out of file_sha256.
struct Fd {
  int fd;
  ~Fd() { if (fd >= 0) ::close(fd); }
};

bool is_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
}  // namespace

std::string sha256_hex(const std::string& bytes) {
  auto ctx = sha256_context();
  if (EVP_DigestUpdate(ctx.get(), bytes.data(), bytes.size()) != 1) throw Error(ErrorKind::runtime, "sha256: update failed");
  return hex_digest(ctx.get());
}

std::string file_sha256(const std::string& path) {
  const Fd file{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (file.fd < 0) throw Error(ErrorKind::io, "cannot read '" + path + "': " + std::strerror(errno));
  auto ctx = sha256_context();
  std::vector<unsigned char> buffer(kChunk);
  for (;;) {
    const ssize_t n = ::read(file.fd, buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error(ErrorKind::io, "cannot read '" + path + "': " + std::strerror(errno));
    if (n == 0) break;
    if (EVP_DigestUpdate(ctx.get(), buffer.data(), static_cast<size_t>(n)) != 1) {
      throw Error(ErrorKind::runtime, "sha256: update failed");
    }
  }
  return hex_digest(ctx.get());
}

void verify_files(const std::string& bundle_dir, const std::map<std::string, std::string>& expected) {
  for (const auto& [name, want] : expected) {
    const std::string path = bundle_dir + "/" + name;
    const std::string where = "bundle '" + bundle_dir + "': file '" + name + "'";
    if (!is_file(path)) throw Error(ErrorKind::bundle, where + " listed in the manifest is missing");
    std::string got;
    try {
      got = file_sha256(path);
    } catch (const Error& e) {
      throw Error(ErrorKind::bundle, where + ": " + e.what());
    }
    if (got != want) {
      throw Error(ErrorKind::bundle, where + " does not match the manifest (sha256 " + got.substr(0, 16) +
                                         "..., recorded " + want.substr(0, 16) +
                                         "...): it was changed or damaged after export (a partial copy, a flipped "
                                         "byte); copy or export the bundle again");
    }
  }
}

}  // namespace sdcpp
