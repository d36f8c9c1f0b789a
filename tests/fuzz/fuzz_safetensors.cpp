// libFuzzer target for the safetensors header validator (core/safetensors_header.*), built with
// clang -fsanitize=fuzzer,address,undefined by tests/CMakeLists.txt and run for a bounded time by
// ctest (test fuzz_safetensors). Each input is a whole file. The validator must either throw
// qf::InputError, or return a header whose byte ranges tile the data section exactly and lie inside
// the input; anything else (another exception, a sanitizer report, a range outside) is a crash.
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "core/error.h"
#include "core/safetensors_header.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Copy into an exact-size heap buffer so AddressSanitizer catches any read past the end.
  std::vector<uint8_t> file(data, data + size);
  try {
    auto h = qf::st::parse_header(file.data(), file.size(), "<fuzz>");
    uint64_t total = 0;
    for (auto& e : h.entries) {
      if (e.end < e.begin || h.data_start + e.end > size) std::abort();
      total += e.end - e.begin;
      if (e.end > e.begin) {
        volatile uint8_t last = file[h.data_start + e.end - 1];  // touches the range's last byte
        (void)last;
      }
    }
    if (total != h.data_len || h.data_start + h.data_len != size) std::abort();
  } catch (const qf::InputError&) {
  }
  return 0;
}
