#include "quant/ggml_more.h"

#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "core/error.h"
#include "quant/ggml_types.h"

namespace qf::quant::ggml {
namespace {

#include "quant/ggml_grids.inc"

float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: exact in float32
    const float v = static_cast<float>(man) * (1.0f / 16777216.0f);
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
uint16_t u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
float sgn(uint8_t bits, int j) { return (bits >> j) & 1 ? -1.0f : 1.0f; }

// gguf-py's IQ dequantizers, value by value: db * grid * sign evaluated as (db * grid) * sign in float32.
void iq2_xxs(const uint8_t* b, float* y) {  // d, then 8 x (4 grid bytes, u32: 4 x 7 sign bits + 4-bit scale)
  const float d = fp16(b);
  for (int ib = 0; ib < 8; ++ib) {
    const uint8_t* q = b + 2 + 8 * ib;
    const uint32_t aux1 = u32(q + 4);
    const float db = d * (0.5f + static_cast<float>(aux1 >> 28)) * 0.25f;
    for (int l = 0; l < 4; ++l) {
      const uint8_t* g = kIq2xxsGrid[q[l]];
      const uint8_t s = kKsigns[(aux1 >> (7 * l)) & 0x7F];
      for (int j = 0; j < 8; ++j) y[32 * ib + 8 * l + j] = db * static_cast<float>(g[j]) * sgn(s, j);
    }
  }
}

void iq2_xs(const uint8_t* b, float* y) {  // d, u16 qs[32] (9-bit grid index, 7-bit sign index), scales[8]
  const float d = fp16(b);
  const uint8_t* sc = b + 66;
  for (int k = 0; k < 32; ++k) {
    const uint16_t q = u16(b + 2 + 2 * k);
    const int s4 = (sc[k / 4] >> (4 * ((k / 2) % 2))) & 0xF;
    const float db = d * (0.5f + static_cast<float>(s4)) * 0.25f;
    const uint8_t* g = kIq2xsGrid[q & 511];
    const uint8_t s = kKsigns[q >> 9];
    for (int j = 0; j < 8; ++j) y[8 * k + j] = db * static_cast<float>(g[j]) * sgn(s, j);
  }
}

void iq2_s(const uint8_t* b, float* y) {  // d, qs[32], signs[32], qh[8], scales[8]
  const float d = fp16(b);
  const uint8_t *qs = b + 2, *signs = b + 34, *qh = b + 66, *sc = b + 74;
  for (int k = 0; k < 32; ++k) {
    const int s4 = (sc[k / 4] >> (4 * ((k / 2) % 2))) & 0xF;
    const float db = d * (0.5f + static_cast<float>(s4)) * 0.25f;
    const int idx = qs[k] | (((qh[k / 4] >> (2 * (k % 4))) & 3) << 8);
    const uint8_t* g = kIq2sGrid[idx];
    for (int j = 0; j < 8; ++j) y[8 * k + j] = db * static_cast<float>(g[j]) * sgn(signs[k], j);
  }
}

void iq3_xxs(const uint8_t* b, float* y) {  // d, qs[64] grid indices, u32 x 8 (4 x 7 sign bits + 4-bit scale)
  const float d = fp16(b);
  for (int ib = 0; ib < 8; ++ib) {
    const uint32_t aux = u32(b + 66 + 4 * ib);
    const float db = d * (0.5f + static_cast<float>(aux >> 28)) * 0.5f;
    for (int v = 0; v < 32; ++v) {
      const uint8_t s = kKsigns[(aux >> (7 * (v / 8))) & 0x7F];
      const uint8_t g = kIq3xxsGrid[b[2 + 8 * ib + v / 4]][v % 4];
      y[32 * ib + v] = db * static_cast<float>(g) * sgn(s, v % 8);
    }
  }
}

void iq3_s(const uint8_t* b, float* y) {  // d, qs[64], qh[8], signs[32], scales[4]
  const float d = fp16(b);
  const uint8_t *qs = b + 2, *qh = b + 66, *signs = b + 74, *sc = b + 106;
  for (int v = 0; v < 256; ++v) {
    const int k = v / 4, ib = v / 32;
    const int s4 = (sc[ib / 2] >> (4 * (ib % 2))) & 0xF;
    const float db = d * static_cast<float>(1 + 2 * s4);
    const int idx = qs[k] | (((qh[k / 8] >> (k % 8)) & 1) << 8);
    y[v] = db * static_cast<float>(kIq3sGrid[idx][v % 4]) * sgn(signs[v / 8], v % 8);
  }
}

void iq1_s(const uint8_t* b, float* y) {  // d, qs[32], u16 qh[8] (4 x 3 index bits, 3-bit scale, delta sign)
  const float d = fp16(b);
  for (int ib = 0; ib < 8; ++ib) {
    const uint16_t qh = u16(b + 34 + 2 * ib);
    const float dl = d * static_cast<float>(2 * ((qh >> 12) & 7) + 1);
    const float delta = (qh & 0x8000) ? -0.125f : 0.125f;
    for (int l = 0; l < 4; ++l) {
      const int idx = b[2 + 4 * ib + l] | (((qh >> (3 * l)) & 7) << 8);
      for (int j = 0; j < 8; ++j) y[32 * ib + 8 * l + j] = dl * (static_cast<float>(kIq1sGrid[idx][j]) + delta);
    }
  }
}

void iq1_m(const uint8_t* b, float* y) {  // qs[32], qh[16], u16 scales[4] (3-bit scales + the fp16 d in top nibbles)
  const uint8_t *qs = b, *qh = b + 32, *sc = b + 48;
  uint16_t s[4];
  for (int i = 0; i < 4; ++i) s[i] = u16(sc + 2 * i);
  const uint16_t dbits = static_cast<uint16_t>(((s[0] & 0xF000) >> 12) | ((s[1] & 0xF000) >> 8) |
                                               ((s[2] & 0xF000) >> 4) | (s[3] & 0xF000));
  uint8_t db2[2];
  std::memcpy(db2, &dbits, 2);
  const float d = fp16(db2);
  for (int k = 0; k < 32; ++k) {  // grid entry k: values 8k..8k+7
    const int m = k / 2;          // its 3-bit scale
    const float dl = d * static_cast<float>(2 * ((s[m / 4] >> (3 * (m % 4))) & 7) + 1);
    const int nib = (qh[k / 2] >> (4 * (k % 2))) & 0xF;
    const int idx = qs[k] | ((nib & 7) << 8);
    const float delta = (nib & 8) == 0 ? 0.125f : -0.125f;
    for (int j = 0; j < 8; ++j) y[8 * k + j] = dl * (static_cast<float>(kIq1sGrid[idx][j]) + delta);
  }
}

void mxfp4(const uint8_t* b, float* y) {  // e8m0 scale (half), qs[16]: low nibbles values 0..15, high 16..31
  const uint8_t e = b[0];
  const uint32_t bits = e < 2 ? (0x00200000u << e) : (static_cast<uint32_t>(e - 1) << 23);
  float d;
  std::memcpy(&d, &bits, 4);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>(kMxfp4Values[b[1 + j] & 0xF]);
    y[16 + j] = d * static_cast<float>(kMxfp4Values[b[1 + j] >> 4]);
  }
}

float ue4m3_half(uint8_t x) {  // gguf-py NVFP4.ue4m3_to_fp32 (0.5 folded in, as kvalues are doubled)
  if (x == 0 || x == 0x7F) return 0.0f;
  const int exp = (x >> 3) & 0xF;
  const float man = static_cast<float>(x & 7);
  float raw;
  if (exp == 0) {
    raw = man * (1.0f / 512.0f);
  } else {
    float p = 1.0f;
    for (int i = 0; i < exp - 7; ++i) p *= 2.0f;
    for (int i = 0; i < 7 - exp; ++i) p *= 0.5f;
    raw = (1.0f + man / 8.0f) * p;
  }
  return raw * 0.5f;
}

void nvfp4(const uint8_t* b, float* y) {  // 4 ue4m3 scales, then 4 x 8 bytes: low nibbles values 0..7, high 8..15
  for (int s = 0; s < 4; ++s) {
    const float d = ue4m3_half(b[s]);
    for (int j = 0; j < 8; ++j) {
      const uint8_t q = b[4 + 8 * s + j];
      y[16 * s + j] = d * static_cast<float>(kMxfp4Values[q & 0xF]);
      y[16 * s + 8 + j] = d * static_cast<float>(kMxfp4Values[q >> 4]);
    }
  }
}

template <class T>
void plain(const uint8_t* b, float* y) {
  T v;
  std::memcpy(&v, b, sizeof(T));
  *y = static_cast<float>(v);
}

const std::vector<MoreType>& more_table() {
  static const std::vector<MoreType> t = {
      {16, "IQ2_XXS", 256, 66, iq2_xxs}, {17, "IQ2_XS", 256, 74, iq2_xs},   {18, "IQ3_XXS", 256, 98, iq3_xxs},
      {19, "IQ1_S", 256, 50, iq1_s},     {21, "IQ3_S", 256, 110, iq3_s},    {22, "IQ2_S", 256, 82, iq2_s},
      {24, "I8", 1, 1, plain<int8_t>},   {25, "I16", 1, 2, plain<int16_t>}, {26, "I32", 1, 4, plain<int32_t>},
      {27, "I64", 1, 8, plain<int64_t>}, {28, "F64", 1, 8, plain<double>},  {29, "IQ1_M", 256, 56, iq1_m},
      {39, "MXFP4", 32, 17, mxfp4},      {40, "NVFP4", 64, 36, nvfp4},
  };
  return t;
}

}  // namespace

const MoreType* more_type(uint32_t id) {
  if (traits_by_gguf_id(id)) return nullptr;  // the one table's row wins once a type lands there
  for (const auto& t : more_table())
    if (t.gguf_id == id) return &t;
  return nullptr;
}

const gguf_in::TypeGeometry* gguf_type_geometry(uint32_t id) {
  static std::mutex mu;
  static std::map<uint32_t, gguf_in::TypeGeometry> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(id);
  if (it != cache.end()) return &it->second;
  if (const TypeTraits* t = traits_by_gguf_id(id))
    return &cache.emplace(id, gguf_in::TypeGeometry{t->gguf_name, t->block, t->bytes}).first->second;
  if (const MoreType* m = more_type(id))
    return &cache.emplace(id, gguf_in::TypeGeometry{m->gguf_name, m->block, m->bytes}).first->second;
  return nullptr;
}

std::string gguf_type_name(uint32_t id) {
  const gguf_in::TypeGeometry* g = gguf_type_geometry(id);
  return g ? g->name : "type " + std::to_string(id);
}

void dequantize_more(const MoreType& t, const uint8_t* src, float* dst, int64_t n) {
  QF_CHECK(n % t.block == 0, "dequantize ", t.gguf_name, ": ", n, " values are not whole blocks of ", t.block);
  for (int64_t i = 0; i < n / t.block; ++i) t.dequant(src + i * t.bytes, dst + i * t.block);
}

}  // namespace qf::quant::ggml
