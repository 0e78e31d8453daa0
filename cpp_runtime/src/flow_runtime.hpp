// Internal: Runtime's flow path (SD3, Flux), docs/bundle_format.md "What a runtime does with a flow bundle" and
// safe_denoiser/runtime/flow_bundle.py: every manifest tokenizer, text_encoder.onnx (SD3: again for the negative
// prompts), Philox initial noise, the FlowMatch Euler loop through denoiser.onnx, vae_decoder.onnx.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ort_session.hpp"
#include "safe_denoiser_cpp/runtime.hpp"

namespace sdcpp {

class FlowTokenizer;

class FlowRuntime {
 public:
  // Creates a checked session of a graph of the bundle (Runtime::open's).
  using SessionFactory = std::function<std::unique_ptr<Ort::Session>(const std::string& graph)>;
  // `manifest` must outlive this object. Loads the tokenizers and the three sessions.
  FlowRuntime(const Manifest& manifest, const std::string& bundle_dir, const SessionFactory& session);
  ~FlowRuntime();
  FlowRuntime(const FlowRuntime&) = delete;
  FlowRuntime& operator=(const FlowRuntime&) = delete;

  // What only the flow path refuses: Flux takes no negative prompt (its guidance scale is an embedding).
  void validate(const Request& request) const;
  // One batch (already validated, the sampler resolved to flow_euler by Runtime::generate): steps 0 means the
  // manifest's.
  std::vector<Result> generate(const std::vector<Request>& requests, int steps);

 private:
  struct Embeddings {
    std::vector<float> prompt, pooled;  // (B, L, D), (B, P)
    std::vector<int64_t> prompt_shape, pooled_shape;
  };
  Embeddings encode(const std::vector<std::string>& prompts);
  // One denoiser call at step s on x; noise_pred into `velocity`, the correction's outputs into the results.
  void denoise(std::vector<float>& x, std::vector<Embeddings>& conditioning, std::vector<float>& guidance,
               const FlowSchedule& schedule, size_t s, std::vector<float>& velocity, std::vector<Result>& results);
  void decode(std::vector<float>& x, int64_t b, std::vector<Result>& results);

  const Manifest& m_;
  bool negatives_ = false;  // SD3: the denoiser takes the negative prompt's embeddings
  std::vector<std::unique_ptr<FlowTokenizer>> tokenizers_;
  std::unique_ptr<Ort::Session> denoiser_, text_encoder_, vae_;
};

}  // namespace sdcpp
