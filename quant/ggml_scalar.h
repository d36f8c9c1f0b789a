// Scalar pieces every llama.cpp block codec shares (quant/ggml_blocks.cpp, quant/ggml_iq.cpp): fp16
// conversion as GGML_FP32_TO_FP16 / GGML_FP16_TO_FP32 (round to nearest even), little-endian u16
// fields, and ggml's nearest_int. Invariant: each is the reference's operation, bit for bit.
#pragma once
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace qf::quant::ggml {

inline uint16_t fp16_bits(float f) { return c10::Half(f).x; }
inline float fp16_value(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

inline void put_u16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v & 0xFF);
  p[1] = static_cast<uint8_t>(v >> 8);
}
inline uint16_t get_u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// ggml's nearest_int: adds 1.5*2^23 so the FPU rounds (to nearest even) into the low mantissa bits.
// Exact for |x| < 2^22; outside that range it returns the same garbage ggml does (no assert here).
inline int nearest_int(float x) {
  float biased = x + 12582912.f;
  int32_t bits;
  std::memcpy(&bits, &biased, sizeof bits);
  return (bits & 0x007fffff) - 0x00400000;
}

}  // namespace qf::quant::ggml
