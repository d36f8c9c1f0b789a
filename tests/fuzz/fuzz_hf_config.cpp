// libFuzzer target for Hugging Face config.json interpretation (models/hf_config.*: what
// read_hf_checkpoint makes of config.json), built with clang -fsanitize=fuzzer,address,undefined by
// tests/CMakeLists.txt (no libtorch: the reader needs only nlohmann/json) and run for a bounded time
// by ctest (test fuzz_hf_config); `make fuzz` runs it for 10^6 inputs. An input is config.json text.
// Parsing must either throw qf::InputError / qf::ConfigError or give a config whose sizes are
// positive and whose KV heads divide the attention heads; anything else (another exception, a
// sanitizer report such as a float-to-int overflow) is a crash. Seeds: tests/fuzz/seeds_hf_config/
// (tests/fuzz/make_seeds_hf_config.py, transformers' own config.json for each architecture).
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/error.h"
#include "models/hf_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const qf::models::HfConfig hc = qf::models::parse_hf_config(text, "<fuzz>/config.json");
    const qf::models::ModelConfig& m = hc.config;
    if (hc.architecture.empty() || hc.torch_dtype.empty()) std::abort();
    if (m.vocab_size <= 0 || m.dim <= 0 || m.n_layers <= 0 || m.n_heads <= 0 || m.kv_heads() <= 0 ||
        m.n_heads % m.kv_heads() != 0 || m.ffn_dim <= 0 || m.max_seq_len <= 0)
      std::abort();
    (void)m.hdim();
    (void)m.family_name();
  } catch (const qf::InputError&) {
  } catch (const qf::ConfigError&) {
  }
  return 0;
}
