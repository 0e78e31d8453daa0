// Tests on real bundles exported by scripts/make_test_bundles.py (folder SD_TEST_BUNDLES): generation, batch
// independence, explicit noise, text bundles, and every bad input the runtime must refuse with a clear error.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "safe_denoiser_cpp/files.hpp"
#include "safe_denoiser_cpp/integrity.hpp"
#include "safe_denoiser_cpp/noise.hpp"
#include "safe_denoiser_cpp/runtime.hpp"
#include "safe_denoiser_cpp/tokenizer.hpp"

using namespace sdcpp;
namespace fs = std::filesystem;

namespace {
const std::string kBundles = SD_TEST_BUNDLES;

std::string bundle(const std::string& name) { return kBundles + "/" + name; }

std::string copy_bundle(const std::string& name) {
  char tmpl[] = "/tmp/sdcpp-bundle-XXXXXX";
  const std::string dir = std::string(mkdtemp(tmpl)) + "/" + name;
  fs::copy(bundle(name), dir, fs::copy_options::recursive);
  return dir;
}

ErrorKind open_error(const std::string& dir, const RuntimeOptions& options = {}, std::string* message = nullptr) {
  try {
    Runtime::open(dir, options);
  } catch (const Error& e) {
    if (message) *message = e.what();
    return e.kind();
  }
  return static_cast<ErrorKind>(0);
}

void edit_manifest(const std::string& dir, const std::function<void(nlohmann::json&)>& edit) {
  auto data = nlohmann::json::parse(read_file(dir + "/manifest.json"));
  edit(data);
  atomic_write(dir + "/manifest.json", data.dump());
}

double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * static_cast<double>(a[i] - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

Request digit(int64_t cls, uint64_t seed, uint32_t item = 0) {
  Request r;
  r.class_label = cls;
  r.seed = seed;
  r.item = item;
  return r;
}
}  // namespace

TEST(Bundle, DemoGenerateIsDeterministicAndBatchIndependent) {
  RuntimeOptions o;
  o.intra_threads = 1;
  auto rt = Runtime::open(bundle("demo_theorem"), o);
  const auto one = rt->generate({digit(3, 7)}, 10);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].sample.size(), 64u);
  EXPECT_EQ(one[0].timesteps.size(), 10u);
  EXPECT_EQ(one[0].kernel_log_mass.size(), 10u);
  EXPECT_EQ(rt->generate({digit(3, 7)}, 10)[0].sample, one[0].sample);
  // Inside a batch with other requests, the same (seed, item) gives the same image.
  const auto three = rt->generate({digit(1, 99), digit(3, 7), digit(7, 5)}, 10);
  EXPECT_LT(rel_diff(three[1].sample, one[0].sample), 1e-6);
  EXPECT_GT(rel_diff(three[0].sample, one[0].sample), 1e-2);
  for (const float v : one[0].image) EXPECT_TRUE(std::isfinite(v));
}

TEST(Bundle, ExplicitNoiseEqualsSeededNoise) {
  auto rt = Runtime::open(bundle("demo_reference"));
  Request explicit_noise = digit(5, 0);
  explicit_noise.noise.resize(64);
  gaussian_noise(11, 0, 0, explicit_noise.noise.data(), 64);
  explicit_noise.seed = 11;  // the re-noise still comes from (seed, item)
  const auto a = rt->generate({explicit_noise}, 6);
  const auto b = rt->generate({digit(5, 11)}, 6);
  EXPECT_EQ(a[0].sample, b[0].sample);
  EXPECT_EQ(a[0].corrected_steps, b[0].corrected_steps);
}

TEST(Bundle, TextBundleTokenizesAndGenerates) {
  for (const char* name : {"tiny_sld", "tiny_theorem"}) {
    auto rt = Runtime::open(bundle(name));
    const auto ids = rt->tokenize({"A photo", ""});
    ASSERT_EQ(ids[0].size(), 77u);
    EXPECT_EQ(ids[0][0], 512);  // <|startoftext|>
    // "a" -> a</w>; "photo" -> p h o t o</w> (no merges in the tiny vocabulary); then <|endoftext|>, padding.
    EXPECT_EQ(ids[0][7], 513);
    EXPECT_EQ(ids[0][76], 513);
    EXPECT_NE(ids[0][6], 513);
    EXPECT_EQ(ids[1][1], 513);
    Request r;
    r.prompt = "a photo of a cat";
    r.seed = 3;
    const auto res = rt->generate({r}, 4);
    EXPECT_EQ(res[0].image_c, 3);
    EXPECT_EQ(res[0].image.size(), static_cast<size_t>(3 * res[0].image_h * res[0].image_w));
    Request wrong;
    wrong.class_label = 1;
    EXPECT_THROW(rt->generate({wrong}), Error);
  }
}

TEST(BadInput, RequestsAreRefusedWithTheField) {
  auto rt = Runtime::open(bundle("demo_theorem"));
  const auto message = [&](const Request& r) {
    try {
      rt->generate({r}, 2);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::input);
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(message(digit(13, 0)).find("class must lie in 0..12 (10 = no class), got 13"), std::string::npos);
  EXPECT_NE(message(digit(-1, 0)).find("class"), std::string::npos);
  Request prompt;
  prompt.prompt = "a cat";
  EXPECT_NE(message(prompt).find("prompt"), std::string::npos);
  Request noise = digit(1, 0);
  noise.noise.assign(63, 0.f);
  EXPECT_NE(message(noise).find("noise: expected 64"), std::string::npos);
  EXPECT_THROW(rt->generate({digit(1, 0)}, 1001), Error);
}

TEST(BadInput, BrokenBundlesAreRefused) {
  std::string why;
  EXPECT_EQ(open_error("/nonexistent/bundle", {}, &why), ErrorKind::bundle);
  EXPECT_NE(why.find("not a folder"), std::string::npos);

  auto dir = copy_bundle("demo_theorem");
  fs::remove(dir + "/denoiser.onnx");
  EXPECT_EQ(open_error(dir, {}, &why), ErrorKind::bundle);
  EXPECT_NE(why.find("'denoiser.onnx' of graph 'denoiser' is missing"), std::string::npos);

  dir = copy_bundle("demo_theorem");
  edit_manifest(dir, [](nlohmann::json& d) { d["format_version"] = kFormatVersion + 1; });
  EXPECT_EQ(open_error(dir, {}, &why), ErrorKind::bundle);
  EXPECT_NE(why.find("format_version " + std::to_string(kFormatVersion + 1)), std::string::npos);

  dir = copy_bundle("demo_theorem");
  edit_manifest(dir, [](nlohmann::json& d) { d["bank"]["sha256"] = std::string(64, '0'); });
  EXPECT_EQ(open_error(dir, {}, &why), ErrorKind::bundle);
  EXPECT_NE(why.find("bank hash mismatch"), std::string::npos);

  dir = copy_bundle("demo_theorem");
  {
    std::string bytes = read_file(dir + "/denoiser.onnx");
    bytes.resize(bytes.size() / 2);
    atomic_write(dir + "/denoiser.onnx", bytes);
  }
  EXPECT_EQ(open_error(dir, {}, &why), ErrorKind::bundle);

  dir = copy_bundle("demo_theorem");
  atomic_write(dir + "/manifest.json", std::string("{\"format\": "));
  EXPECT_EQ(open_error(dir, {}, &why), ErrorKind::bundle);
  EXPECT_NE(why.find("JSON"), std::string::npos);

  dir = copy_bundle("tiny_sld");
  fs::remove(dir + "/tokenizer/tokenizer.json");
  EXPECT_EQ(open_error(dir, {}, &why), ErrorKind::bundle);
  EXPECT_NE(why.find("tokenizer.json"), std::string::npos);
}

// Fuzz finding (fuzz/regressions/tokenizer_json/): a float id such as 5e19 was converted to int64 (undefined
// behaviour), 2.5 silently truncated. Every id field must be an integer in range, named when it is not.
TEST(Bundle, TokenizerIdsMustBeIntegers) {
  const std::string dir = copy_bundle("tiny_theorem") + "/tokenizer";
  const auto original = nlohmann::json::parse(read_file(dir + "/tokenizer.json"));
  EXPECT_NO_THROW(ClipTokenizer::load(dir));
  const auto error_with = [&](const std::function<void(nlohmann::json&)>& edit) {
    auto data = original;
    edit(data);
    atomic_write(dir + "/tokenizer.json", data.dump());
    try {
      ClipTokenizer::load(dir);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::bundle);
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  const std::string first = original["model"]["vocab"].begin().key();
  for (const double id : {5e19, 2.5, -1.0}) {
    EXPECT_NE(error_with([&](auto& d) { d["model"]["vocab"][first] = id; }).find("model.vocab values must be an integer id"),
              std::string::npos) << id;
  }
  EXPECT_NE(error_with([](auto& d) { d["model"]["vocab"]["zz"] = -1; }).find("model.vocab values"), std::string::npos);
  EXPECT_NE(error_with([](auto& d) { d["added_tokens"][0]["id"] = 1e30; }).find("added_tokens[].id"), std::string::npos);
  EXPECT_NE(error_with([](auto& d) { d["post_processor"]["cls"][1] = 3e22; }).find("post_processor.cls[1]"),
            std::string::npos);
  EXPECT_NE(error_with([](auto& d) { d["post_processor"]["sep"][1] = "1"; }).find("post_processor.sep[1]"),
            std::string::npos);
  EXPECT_NE(error_with([](auto& d) { d["padding"] = {{"pad_id", 1.5}}; }).find("padding.pad_id"), std::string::npos);
}

TEST(Bundle, GuidancePresetsMatchTheGraphs) {
  // odds carries the reference bank inside denoiser.onnx; reference takes the re-noise input.
  const Manifest odds = Manifest::load(bundle("demo_odds"));
  ASSERT_TRUE(odds.guidance.has_value());
  EXPECT_EQ(odds.guidance->preset, GuidancePreset::odds);
  EXPECT_TRUE(odds.reference_bank.has_value());
  const Manifest reference = Manifest::load(bundle("demo_reference"));
  EXPECT_TRUE(reference.reference());
  EXPECT_NE(reference.graphs.at("denoiser").input("noise"), nullptr);
  EXPECT_FALSE(reference.reference_bank.has_value());
  // A preset that contradicts the bundle's banks is refused naming the field.
  auto dir = copy_bundle("demo_reference");
  edit_manifest(dir, [](nlohmann::json& d) { d["guidance"]["preset"] = "odds"; });
  std::string why;
  EXPECT_EQ(open_error(dir, {}, &why), ErrorKind::bundle);
  EXPECT_NE(why.find("reference_bank must be set exactly when guidance.preset is 'odds'"), std::string::npos) << why;
  dir = copy_bundle("demo_reference");
  edit_manifest(dir, [](nlohmann::json& d) { d["guidance"]["preset"] = "theorem"; });
  EXPECT_EQ(open_error(dir, {}, &why), ErrorKind::bundle);
  EXPECT_NE(why.find("guidance.preset must be"), std::string::npos) << why;
}

void flip_byte(const std::string& path, size_t at) {
  std::string bytes = read_file(path);
  ASSERT_LT(at, bytes.size());
  bytes[at] = static_cast<char>(bytes[at] ^ 0x01);
  atomic_write(path, bytes);
}

std::string load_error(const std::string& dir, bool check_files = true) {
  try {
    Manifest::load(dir, true, check_files);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bundle) << e.what();
    return e.what();
  }
  return "accepted";
}

TEST(BadInput, EveryListedFileIsHashed) {
  // Intact bundles load; their files' hashes (recorded by Python's hashlib at export) equal the C++ ones.
  for (const char* name : {"demo_theorem", "tiny_sld"}) {
    const Manifest m = Manifest::load(bundle(name));
    EXPECT_GE(m.files.size(), std::string(name) == "tiny_sld" ? 5u : 1u) << name;
    for (const auto& [file, digest] : m.files) EXPECT_EQ(file_sha256(bundle(name) + "/" + file), digest) << file;
  }
  // One flipped byte in the denoiser's weights (the middle of the file), or in a tokenizer file.
  auto dir = copy_bundle("demo_theorem");
  flip_byte(dir + "/denoiser.onnx", fs::file_size(dir + "/denoiser.onnx") / 2);
  EXPECT_NE(load_error(dir).find("file 'denoiser.onnx' does not match the manifest"), std::string::npos)
      << load_error(dir);
  for (const char* file : {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "vae_decoder.onnx"}) {
    dir = copy_bundle("tiny_sld");
    flip_byte(dir + "/" + file, 10);
    EXPECT_NE(load_error(dir).find("file '" + std::string(file) + "' does not match the manifest"), std::string::npos)
        << load_error(dir);
  }
  dir = copy_bundle("tiny_sld");
  fs::remove(dir + "/tokenizer/tokenizer_config.json");
  EXPECT_NE(load_error(dir).find("file 'tokenizer/tokenizer_config.json' listed in the manifest is missing"),
            std::string::npos)
      << load_error(dir);
  // The opt-out: a recorded hash that no longer matches is refused, and accepted with check_files off.
  dir = copy_bundle("demo_theorem");
  edit_manifest(dir, [](nlohmann::json& d) { d["files"]["denoiser.onnx"] = std::string(64, 'a'); });
  std::string why;
  EXPECT_EQ(open_error(dir, {}, &why), ErrorKind::bundle);
  EXPECT_NE(why.find("'denoiser.onnx' does not match"), std::string::npos) << why;
  RuntimeOptions skip;
  skip.check_files = false;
  EXPECT_EQ(open_error(dir, skip, &why), static_cast<ErrorKind>(0)) << why;
  // A malformed list is refused whether or not the files are hashed.
  dir = copy_bundle("demo_theorem");
  edit_manifest(dir, [](nlohmann::json& d) { d["files"]["../manifest.json"] = std::string(64, 'a'); });
  EXPECT_NE(load_error(dir, false).find("files['../manifest.json'] must be a relative path inside the bundle"), std::string::npos) << load_error(dir, false);
  dir = copy_bundle("demo_theorem");
  edit_manifest(dir, [](nlohmann::json& d) { d["files"]["denoiser.onnx"] = "ABC"; });
  EXPECT_NE(load_error(dir, false).find("files['denoiser.onnx'] must be a sha256"), std::string::npos)
      << load_error(dir, false);
}

TEST(BadInput, ProvidersAbsentFromTheLibraryAreClearErrors) {
  std::string why;
  RuntimeOptions o;
  o.provider = "rocm";
  EXPECT_EQ(open_error(bundle("demo_theorem"), o, &why), ErrorKind::provider);
  for (const char* p : {"cuda", "tensorrt"}) {
    o.provider = p;
    const auto available = available_providers();
    const bool present = std::find(available.begin(), available.end(), provider_name(p)) != available.end();
    if (present) continue;  // a GPU build: covered by the device script instead
    EXPECT_EQ(open_error(bundle("demo_theorem"), o, &why), ErrorKind::provider) << p;
    EXPECT_NE(why.find("not available"), std::string::npos) << why;
    // The append path itself (what runs when the provider is listed but cannot start) also fails cleanly.
    setenv("SAFE_DENOISER_CPP_SKIP_PROVIDER_CHECK", "1", 1);
    EXPECT_EQ(open_error(copy_bundle("demo_theorem"), o, &why), ErrorKind::provider) << p;
    EXPECT_NE(why.find("could not be set up"), std::string::npos) << why;
    unsetenv("SAFE_DENOISER_CPP_SKIP_PROVIDER_CHECK");
  }
}

// ---- issue 26 ------------------------------------------------------------------------------------------------------
// A 27-byte denoiser.onnx whose length wraps the reader's position, its hash recorded in the manifest: open() must
// refuse it (it spun forever, with or without the file check).
TEST(BadInput, CraftedOnnxWithMatchingHashIsRefusedQuickly) {
  // ModelProto {ir_version 8, graph 7 {initializer 5 of length 2^64 - 11, name "negative"}}: the 11 bytes of the
  // initializer's tag and length, so that the old reader's position wrapped back onto that tag, again and again.
  std::string graph = "\x2a\xf5";                                // field 5, wire 2; varint 2^64 - 11 (10 bytes)
  graph += std::string(8, '\xff') + '\x01';
  graph += "\x42\x08" "negative";                                // field 8: a name
  const std::string crafted = std::string("\x08\x08\x3a") + static_cast<char>(graph.size()) + graph;
  ASSERT_LE(crafted.size(), 32u);
  const auto dir = copy_bundle("demo_theorem");
  atomic_write(dir + "/denoiser.onnx", crafted);
  edit_manifest(dir, [&](nlohmann::json& d) { d["files"]["denoiser.onnx"] = sha256_hex(crafted); });
  for (const bool check_files : {true, false}) {
    RuntimeOptions options;
    options.check_files = check_files;
    std::string why;
    const auto start = std::chrono::steady_clock::now();
    EXPECT_EQ(open_error(dir, options, &why), ErrorKind::bundle);
    EXPECT_NE(why.find("is not a readable ONNX file"), std::string::npos) << why;
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
  }
}

// The finite checks of safe_denoiser/runtime: NaN never becomes an image.
TEST(BadInput, NonFiniteInputsAndSamplesAreErrors) {
  auto rt = Runtime::open(bundle("demo_theorem"));
  const auto error = [&](const std::vector<Request>& batch, int steps, ErrorKind kind) {
    try {
      rt->generate(batch, steps);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), kind) << e.what();
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  Request nan = digit(1, 0);
  nan.noise.assign(64, 0.f);
  nan.noise[5] = NAN;
  EXPECT_NE(error({nan}, 2, ErrorKind::input).find("noise: holds NaN or Inf (value 5)"), std::string::npos);
  Request guided = digit(1, 0);
  for (const double g : {1e30, -1001.0, static_cast<double>(NAN), static_cast<double>(INFINITY)}) {
    guided.guidance = g;
    EXPECT_NE(error({guided}, 2, ErrorKind::input).find("guidance: expected a finite number in -1000..1000"),
              std::string::npos) << g;
  }
  EXPECT_NE(error({digit(1, 0)}, -1, ErrorKind::input).find("steps must lie in 1..1000"), std::string::npos);
  // Finite but huge initial noise overflows inside the first step: the error names the step and the image.
  Request huge = digit(1, 0);
  huge.noise.assign(64, 3e38f);
  EXPECT_NE(error({digit(2, 0), huge}, 2, ErrorKind::runtime)
                .find("step 1 of 2 (timestep 999) made non-finite samples for image(s) [1]"),
            std::string::npos);
  // The bound itself is accepted.
  guided.guidance = 1000.0;
  EXPECT_EQ(rt->generate({guided}, 2).size(), 1u);
}

TEST(BadInput, InvalidUtf8PromptsAreRefused) {
  auto rt = Runtime::open(bundle("tiny_sld"));
  Request r;
  r.prompt = "a \xff cat";
  try {
    rt->validate(r);
    FAIL() << "an invalid UTF-8 prompt was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::input);
    EXPECT_NE(std::string(e.what()).find("prompt: not valid UTF-8 text"), std::string::npos) << e.what();
  }
  r.prompt = "a cat";
  r.negative_prompt = "\xed\xa0\x80";  // a UTF-16 surrogate encoded in UTF-8
  EXPECT_THROW(rt->validate(r), Error);
  EXPECT_THROW(rt->tokenize({"\xc0\xaf"}), Error);
}
