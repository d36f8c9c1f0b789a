#include "quant/ggml_types.h"

#include "core/error.h"

namespace qf::quant::ggml {

const std::vector<TypeTraits>& type_table() {
  // Block geometry as ggml-common.h's block_* structs (static_asserted sizes there).
  static const std::vector<TypeTraits> t = {
      {0, "f32", "f32", "F32", Rule::Affine, 1, 4, 32, true},
      {1, "f16", "f16", "F16", Rule::Affine, 1, 2, 16, true},
      {2, "q4_0", "q4_0", "Q4_0", Rule::GgmlQ4_0, 32, 18, 4, true},
      {3, "q4_1", "q4_1", "Q4_1", Rule::GgmlQ4_1, 32, 20, 4, false},
      {6, "q5_0", "q5_0", "Q5_0", Rule::GgmlQ5_0, 32, 22, 5, true},
      {7, "q5_1", "q5_1", "Q5_1", Rule::GgmlQ5_1, 32, 24, 5, false},
      {8, "q8_0", "q8_0", "Q8_0", Rule::GgmlQ8_0, 32, 34, 8, true},
      {10, "q2_k", "q2_K", "Q2_K", Rule::GgmlQ2_K, 256, 84, 2, false},
      {11, "q3_k", "q3_K", "Q3_K", Rule::GgmlQ3_K, 256, 110, 3, true},
      {12, "q4_k", "q4_K", "Q4_K", Rule::GgmlQ4_K, 256, 144, 4, false},
      {13, "q5_k", "q5_K", "Q5_K", Rule::GgmlQ5_K, 256, 176, 5, false},
      {14, "q6_k", "q6_K", "Q6_K", Rule::GgmlQ6_K, 256, 210, 6, true},
      {20, "iq4_nl", "iq4_nl", "IQ4_NL", Rule::GgmlIQ4_NL, 32, 18, 4, true},
      {23, "iq4_xs", "iq4_xs", "IQ4_XS", Rule::GgmlIQ4_XS, 256, 136, 4, true},
      {30, "bf16", "bf16", "BF16", Rule::Affine, 1, 2, 16, true},
      {34, "tq1_0", "tq1_0", "TQ1_0", Rule::GgmlTQ1_0, 256, 54, 2, true},  // ternary codes {-1, 0, 1}
      {35, "tq2_0", "tq2_0", "TQ2_0", Rule::GgmlTQ2_0, 256, 66, 2, true},
      {41, "q1_0", "q1_0", "Q1_0", Rule::GgmlQ1_0, 128, 18, 1, true},  // signs: +-d
      {42, "q2_0", "q2_0", "Q2_0", Rule::GgmlQ2_0, 64, 18, 2, true},    // codes {-1, 0, 1, 2} * d
  };
  return t;
}

const char* rule_label(Rule r) {
  switch (r) {
    case Rule::Affine: return "affine";
    case Rule::IntZeroPoint: return "int-zero-point";
    case Rule::GgmlQ8_0: return "q8_0";
    case Rule::GgmlQ4_0: return "q4_0";
    case Rule::GgmlQ4_1: return "q4_1";
    case Rule::GgmlQ5_0: return "q5_0";
    case Rule::GgmlQ5_1: return "q5_1";
    case Rule::GgmlQ2_K: return "q2_k";
    case Rule::GgmlQ3_K: return "q3_k";
    case Rule::GgmlQ4_K: return "q4_k";
    case Rule::GgmlQ5_K: return "q5_k";
    case Rule::GgmlQ6_K: return "q6_k";
    case Rule::GgmlIQ4_NL: return "iq4_nl";
    case Rule::GgmlIQ4_XS: return "iq4_xs";
    case Rule::GgmlTQ1_0: return "tq1_0";
    case Rule::GgmlTQ2_0: return "tq2_0";
    case Rule::GgmlQ1_0: return "q1_0";
    case Rule::GgmlQ2_0: return "q2_0";
  }
  return "?";
}

const TypeTraits& traits(Rule r) {
  if (r != Rule::Affine)
    for (const auto& t : type_table())
      if (t.rule == r) return t;
  std::string all;
  for (const auto& t : type_table())
    if (t.rule != Rule::Affine) all += (all.empty() ? "" : ", ") + std::string(t.name);
  if (r == Rule::Affine || r == Rule::IntZeroPoint)
    throw Error(str("ggml block formats: rule '", rule_label(r), "' is not a llama.cpp block format (expected one of ",
                    all, ")"));
  throw Error(str("ggml block formats: llama.cpp type ", rule_label(r), " is not implemented in qforge (implemented: ",
                  all, ")"));
}

const TypeTraits* traits_by_name(const std::string& name) {
  for (const auto& t : type_table())
    if (name == t.name) return &t;
  return nullptr;
}

const TypeTraits* traits_by_gguf_id(uint32_t id) {
  for (const auto& t : type_table())
    if (t.gguf_id == id) return &t;
  return nullptr;
}

}  // namespace qf::quant::ggml
