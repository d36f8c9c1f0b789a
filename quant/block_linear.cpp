#include "quant/block_linear.h"

#include <ATen/ATen.h>

#include "core/error.h"
#include "quant/fake_quant.h"
#include "quant/ggml_blocks.h"
#include "quant/ggml_types.h"

namespace qf::quant {

BlockLinear::BlockLinear(Rule r, const at::Tensor& blocks, int64_t cols, const at::Tensor& b)
    : FrozenLinear(cols, blocks.dim() == 2 ? blocks.size(0) : 0), rule(r),
      spec_(QuantSpec::preset_named(ggml::traits(r).name)) {
  const auto& t = ggml::traits(r);
  QF_CHECK(cols > 0 && cols % t.block == 0, "BlockLinear: ", t.name, " holds rows of whole ", t.block,
           "-value blocks; a row of ", cols, " values is not one");
  const int64_t row_bytes = cols / t.block * t.bytes;
  QF_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.size(1) == row_bytes, "BlockLinear: ",
           t.name, " blocks of ", cols, "-value rows are uint8 [out, ", row_bytes, "], got ", blocks.scalar_type(), " ",
           blocks.sizes());
  QF_CHECK(!b.defined() || (b.dim() == 1 && b.size(0) == out_features), "BlockLinear: bias must be [", out_features,
           "], got ", b.sizes());
  weight = register_buffer("weight", blocks.detach().contiguous());
  if (b.defined()) bias = register_buffer("bias", b.detach().to(at::kFloat).clone());
}

BlockLinear::BlockLinear(const at::Tensor& w, const at::Tensor& b, Rule r)
    : BlockLinear(r, ggml::quantize(w.detach().to(at::kFloat), r), w.size(1), b) {}

at::Tensor BlockLinear::materialize(at::ScalarType dtype) const {
  return ggml::dequantize(weight, rule, in_features).to(dtype);
}

at::Tensor BlockLinear::forward_merged(const at::Tensor& x, const at::Tensor& delta) const {
  // The fake quantizer runs in float32 on the merged weight (what quantize() of the merge reads);
  // its straight-through gradient reaches delta (and through it A and B), never the blocks.
  auto merged = fake_quant_ste(materialize(at::kFloat) + delta.to(at::kFloat), spec_);
  auto bb = bias.defined() ? bias.to(x.scalar_type()) : at::Tensor();
  return at::linear(x, merged.to(x.scalar_type()), bb);
}

at::Tensor BlockLinear::merged_fake_quant(const at::Tensor& delta) const {
  at::NoGradGuard ng;
  return fake_quant_values(materialize(at::kFloat) + delta.to(at::kFloat), spec_);
}

std::shared_ptr<QuantizedLinear> BlockLinear::packed(const at::Tensor& w) const {
  at::NoGradGuard ng;
  auto q = std::make_shared<QuantizedLinear>(in_features, out_features, bias.defined(), spec_, std::nullopt);
  const at::Tensor blocks = w.defined() ? ggml::quantize(w.to(at::kFloat), rule) : weight;
  q->qweight.copy_(blocks);
  if (bias.defined()) q->bias.copy_(bias);
  q->to(weight.device());
  return q;
}

BlockLinear& BlockLinear::record_type() {
  const auto id = static_cast<int32_t>(ggml::traits(rule).gguf_id);
  register_buffer("ggml_type", at::full({1}, id, at::TensorOptions().dtype(at::kInt).device(weight.device())));
  return *this;
}

int64_t BlockLinear::stored_bytes() const {
  return weight.numel() + (bias.defined() ? bias.numel() * bias.element_size() : 0);
}

void BlockLinear::pretty_print(std::ostream& s) const {
  s << "qf::BlockLinear(" << ggml::traits(rule).name << ", in=" << in_features << ", out=" << out_features
    << (bias.defined() ? ", bias" : "") << ")";
}

}  // namespace qf::quant
