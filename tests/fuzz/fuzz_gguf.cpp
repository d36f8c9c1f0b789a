// libFuzzer target for GGUF files in: the container reader (core/gguf_file.*: header, metadata,
// tensor infos, check_tensors with qforge's type geometry), the config read from the metadata
// (models/gguf_config.*) and the read-only dequantizers (quant/ggml_more.*), built with clang
// -fsanitize=fuzzer,address,undefined by tests/CMakeLists.txt (no libtorch) and run for a bounded time
// by ctest (test fuzz_gguf); `make fuzz` runs it for 10^6 inputs. An input is a whole file.
// Reading must either throw qf::InputError or give a File whose every tensor's bytes lie inside the
// input (each is read in full here: ASan reports any byte outside) and whose config is consistent;
// any other exception or a sanitizer report is a crash. Seeds: tests/fuzz/seeds_gguf/
// (tests/fuzz/make_seeds_gguf.py: gguf-py's GGUFWriter files per architecture and type, and broken ones).
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "core/error.h"
#include "core/gguf_file.h"
#include "models/arch.h"
#include "models/gguf_config.h"
#include "quant/ggml_more.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  try {
    auto f = qf::gguf_in::File::parse(bytes, "<fuzz>.gguf", qf::quant::ggml::gguf_type_geometry);
    volatile uint32_t sum = 0;
    std::vector<float> out;
    for (const auto& t : f->tensors()) {
      const uint8_t* p = f->data(t);
      if (p < data || p + t.nbytes > data + size) std::abort();
      for (uint64_t i = 0; i < t.nbytes; ++i) sum += p[i];
      const auto* m = qf::quant::ggml::more_type(t.type);
      if (m && t.numel <= (1 << 16)) {
        out.resize(static_cast<size_t>(t.numel));
        qf::quant::ggml::dequantize_more(*m, p, out.data(), t.numel);
      }
    }
    const auto info = qf::models::gguf_model_info(*f);
    const auto& c = info.config;
    if (c.vocab_size <= 0 || c.dim <= 0 || c.n_layers <= 0 || c.n_heads <= 0 || c.kv_heads() <= 0 ||
        c.n_heads % c.kv_heads() != 0)
      std::abort();
    const auto& arch = qf::models::arch_spec(c.family);
    for (const auto& t : f->tensors()) (void)qf::models::gguf_param(arch, c, t.name);
  } catch (const qf::InputError&) {
  }
  return 0;
}
