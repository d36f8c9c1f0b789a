#include "models/packed_linear.h"

#include <ATen/ATen.h>

#include "core/error.h"

namespace qf::models {

PackedIntLinear::PackedIntLinear(const PackedInt& p, int64_t out, int64_t in, const at::Tensor& b)
    : FrozenLinear(in, out), bits(p.bits) {
  QF_CHECK(bits == 2 || bits == 4 || bits == 8, "PackedIntLinear: ", bits, "-bit codes are not supported (2, 4 or 8)");
  const int64_t pf = 32 / bits, groups = p.scales.defined() && p.scales.dim() == 2 ? p.scales.size(0) : 0;
  auto check = [&](const at::Tensor& t, const char* name, at::ScalarType dt, std::vector<int64_t> shape) {
    QF_CHECK(t.defined() && t.scalar_type() == dt && t.sizes() == at::IntArrayRef(shape), "PackedIntLinear: ", name,
             " of a [", out, ", ", in, "] ", bits, "-bit linear must be ", dt, " ", at::IntArrayRef(shape), ", got ",
             t.defined() ? t.toString() : std::string("nothing"), " ", t.defined() ? t.sizes() : at::IntArrayRef{});
  };
  check(p.qweight, "qweight", at::kInt, {(in + pf - 1) / pf, out});
  check(p.qzeros, "qzeros", at::kInt, {groups, (out + pf - 1) / pf});
  QF_CHECK(groups > 0 && at::isFloatingType(p.scales.scalar_type()) && p.scales.size(1) == out,
           "PackedIntLinear: scales must be float [groups, ", out, "], got ", p.scales.sizes());
  check(p.g_idx, "g_idx", at::kInt, {in});
  qweight = register_buffer("qweight", p.qweight);
  qzeros = register_buffer("qzeros", p.qzeros);
  scales = register_buffer("scales", p.scales);
  g_idx = register_buffer("g_idx", p.g_idx);
  if (b.defined()) bias = register_buffer("bias", b.detach().to(at::kFloat).clone());
}

std::shared_ptr<PackedIntLinear> PackedIntLinear::from_checkpoint(const HfQuant& q, const std::string& linear,
                                                                  int64_t out, int64_t in,
                                                                  const std::map<std::string, at::Tensor>& parts,
                                                                  const at::Tensor& bias) {
  const bool fp8 = q.method == HfQuantMethod::CompressedTensors && parts.count("weight") &&
                   parts.at("weight").scalar_type() == at::kFloat8_e4m3fn;
  if (fp8 || (q.method == HfQuantMethod::Gptq && 32 % q.bits != 0))
    throw ConfigError(std::vector<std::string>{str(
        "peft.base: packed: layer ", linear, " is stored as ", fp8 ? std::string("compressed-tensors fp8 (float8_e4m3fn)") : str("GPTQ int", q.bits),
        ", which packed does not keep (it keeps int codes that tile an int32 word: GPTQ / AWQ / compressed-tensors int2, "
        "int4, int8); use peft.base fp32, bf16, nf4 or a llama.cpp type to train LoRA on this checkpoint dequantized")});
  if (q.method == HfQuantMethod::Bnb8)
    throw ConfigError(std::vector<std::string>{str(
        "peft.base: packed: layer ", linear, " is a bitsandbytes 8-bit (LLM.int8) linear; packed keeps GPTQ / AWQ / "
        "compressed-tensors int codes. Use peft.base: int8 to keep its int8 weight and SCB as the frozen base")});
  return std::make_shared<PackedIntLinear>(packed_int(q, linear, out, in, parts), out, in, bias);
}

std::shared_ptr<PackedIntLinear> PackedIntLinear::zeros(int bits, int64_t groups, at::ScalarType scale_dtype,
                                                        int64_t out, int64_t in, bool bias) {
  QF_CHECK(bits == 2 || bits == 4 || bits == 8, "PackedIntLinear: ", bits, "-bit codes are not supported (2, 4 or 8)");
  const int64_t pf = 32 / bits;
  PackedInt p;
  p.bits = bits;
  p.qweight = at::zeros({(in + pf - 1) / pf, out}, at::kInt);
  p.qzeros = at::zeros({groups, (out + pf - 1) / pf}, at::kInt);
  p.scales = at::zeros({groups, out}, scale_dtype);
  p.g_idx = at::zeros({in}, at::kInt);
  return std::make_shared<PackedIntLinear>(p, out, in, bias ? at::zeros({out}) : at::Tensor());
}

PackedInt PackedIntLinear::state() const {
  PackedInt p{bits, qweight, qzeros, scales, g_idx};
  const int64_t version = static_cast<int64_t>(g_idx._version());
  if (version != g_idx_version_) {  // new g_idx data (built, or a state loaded into it): checked once
    const int64_t lo = g_idx.min().item<int64_t>(), hi = g_idx.max().item<int64_t>();
    QF_CHECK_INPUT(lo >= 0 && hi < scales.size(0), "PackedIntLinear: g_idx holds groups in [", lo, ", ", hi,
                   "] but the scales have ", scales.size(0), " groups");
    group_size_ = contiguous_group_size(p, in_features);
    g_idx_version_ = version;
  }
  p.group_size = group_size_;
  return p;
}

at::Tensor PackedIntLinear::materialize(at::ScalarType dtype) const {
  return dequantize_packed_int(state(), out_features, in_features).to(dtype);
}

int64_t PackedIntLinear::stored_bytes() const {
  int64_t n = 0;
  for (const auto& t : {qweight, qzeros, scales, g_idx, bias})
    if (t.defined()) n += t.numel() * t.element_size();
  return n;
}

void PackedIntLinear::pretty_print(std::ostream& s) const {
  s << "qf::PackedIntLinear(int" << bits << ", in=" << in_features << ", out=" << out_features
    << ", groups=" << scales.size(0) << (bias.defined() ? ", bias" : "") << ")";
}

}  // namespace qf::models
