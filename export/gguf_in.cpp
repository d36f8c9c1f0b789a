#include "export/gguf_in.h"

#include <ATen/ATen.h>

#include <cmath>
#include <map>
#include <set>

#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "models/arch.h"
#include "quant/ggml_blocks.h"
#include "quant/ggml_more.h"
#include "quant/ggml_types.h"

namespace qf::exporter {
namespace {

using gguf_in::TensorInfo;

bool is_rope_table(const std::string& n) {
  return n == "rope_freqs.weight" || n == "rope_factors_long.weight" || n == "rope_factors_short.weight";
}

// convert_hf_to_gguf.py's permute undone: rows [heads, hd/2, 2] (interleaved) -> [heads, 2, hd/2].
at::Tensor unpermute_rows(const at::Tensor& rows, int64_t heads) {
  const int64_t n = rows.size(0);
  return rows.reshape({heads, n / heads / 2, 2, -1}).transpose(1, 2).reshape({n, -1}).contiguous();
}

const gguf_in::TypeGeometry* geometry(uint32_t id) { return quant::ggml::gguf_type_geometry(id); }

}  // namespace

std::string gguf_type_support(uint32_t type) {
  if (type == 0) return "float32 as stored";
  if (type == 1 || type == 30) return "widened to float32 (exact)";
  if (const auto* t = quant::ggml::traits_by_gguf_id(type))
    return t->rule == quant::Rule::Affine ? "float" : "dequantized (qforge's " + std::string(t->name) + " codec; LoRA base keeps the blocks)";
  if (quant::ggml::more_type(type)) return "dequantized (read-only type)";
  return "";
}

at::Tensor gguf_tensor_f32(const gguf_in::File& f, const TensorInfo& t) {
  auto* p = const_cast<uint8_t*>(f.data(t));
  const int64_t cols = t.ne[0], rows = t.rows();
  std::vector<int64_t> shape = t.shape();
  if (t.type == 0) return at::from_blob(p, shape, at::kFloat).clone();
  if (t.type == 1) return at::from_blob(p, shape, at::kHalf).to(at::kFloat);
  if (t.type == 30) return at::from_blob(p, shape, at::kBFloat16).to(at::kFloat);
  if (const auto* tr = quant::ggml::traits_by_gguf_id(t.type)) {
    at::Tensor blocks = at::from_blob(p, {rows, static_cast<int64_t>(t.nbytes / std::max<int64_t>(1, rows))}, at::kByte);
    try {
      return quant::ggml::dequantize(blocks, tr->rule, cols).reshape(shape);
    } catch (const InputError&) {
      throw;
    } catch (const Error& e) {
      throw InputError(str(f.origin(), ": tensor '", t.name, "' (", tr->gguf_name, "): ", e.what()));
    }
  }
  if (const auto* m = quant::ggml::more_type(t.type)) {
    at::Tensor out = at::empty(shape, at::kFloat);
    quant::ggml::dequantize_more(*m, p, out.data_ptr<float>(), t.numel);
    return out;
  }
  throw InputError(str(f.origin(), ": tensor '", t.name, "' has type ", quant::ggml::gguf_type_name(t.type),
                       ", which qforge cannot dequantize"));
}

GgufCheckpoint read_gguf(const std::string& path) {
  GgufCheckpoint ck;
  ck.file = gguf_in::File::open(path, geometry);
  ck.info = models::gguf_model_info(*ck.file);
  return ck;
}

void load_gguf_weights(models::CausalLM& model, const GgufCheckpoint& ck, bool progress,
                       const models::LinearStreamer* streamer, GgufLoadReport* report) {
  const gguf_in::File& f = *ck.file;
  const std::string& o = f.origin();
  const auto& c = ck.info.config;
  const models::ArchSpec& arch = models::arch_spec(c.family);
  std::map<std::string, at::Tensor> params;
  for (auto& p : model.named_parameters()) params[p.key()] = p.value();
  // Pass 1: every tensor named, shaped and typed as the model needs, before anything is copied.
  std::vector<std::string> problems;
  std::map<std::string, const TensorInfo*> src;  // param -> tensor
  std::set<std::string> norms;                   // params stored as 1 + w (Gemma)
  std::map<std::string, int64_t> qk_heads;       // params whose rows llama.cpp permuted -> heads
  for (const TensorInfo& t : f.tensors()) {
    if (is_rope_table(t.name)) continue;
    if (t.name == "output.weight" && ck.info.norm_plus_one) continue;  // gemma: the tied embedding is used
    const std::string p = models::gguf_param(arch, c, t.name);
    auto it = params.find(p);
    if (p.empty() || it == params.end()) {
      problems.push_back(str(o, ": unexpected tensor '", t.name, "' for general.architecture ", ck.info.arch,
                             " (not loaded)"));
      continue;
    }
    if (t.shape() != it->second.sizes().vec())
      problems.push_back(qf::str(o, ": tensor '", t.name, "' has shape ", at::IntArrayRef(t.shape()), " but the metadata implies ",
                             it->second.sizes(), " for ", p));
    if (gguf_type_support(t.type).empty())
      problems.push_back(str(o, ": tensor '", t.name, "' has type ", quant::ggml::gguf_type_name(t.type),
                             ", which qforge cannot dequantize"));
    src[p] = &t;
    const std::string rest = t.name.rfind("blk.", 0) == 0 ? t.name.substr(t.name.find('.', 4) + 1) : t.name;
    if (ck.info.norm_plus_one) {
      if (t.name == "output_norm.weight") norms.insert(p);
      for (auto& lt : arch.layer_tensors)
        if (lt.gguf == rest) norms.insert(p);
    }
    if (ck.info.permuted_qk)
      for (auto& l : arch.linears)
        if (rest == l.gguf + ".weight" && l.rope_rows != models::RopeRows::None)
          qk_heads[p] = l.rope_rows == models::RopeRows::QueryHeads ? c.n_heads : c.kv_heads();
  }
  for (auto& [name, p] : params)
    if (!src.count(name)) problems.push_back(str(o, ": weight '", name, "' has no tensor in the file"));
  if (!problems.empty()) {
    std::string msg = str("cannot load ", o, " (", problems.size(), " problem", problems.size() > 1 ? "s" : "", "):");
    for (size_t i = 0; i < problems.size() && i < 20; ++i) msg += "\n  - " + problems[i];
    if (problems.size() > 20) msg += str("\n  ... and ", problems.size() - 20, " more");
    throw InputError(msg);
  }
  std::map<std::string, models::LinearSlot*> streamed;  // weight name -> slot
  if (streamer)
    for (auto& ns : models::linear_slots(model))
      if (std::dynamic_pointer_cast<models::DenseLinear>(ns.slot->get()) && streamer->claims(ns.name))
        streamed[ns.name + ".weight"] = ns.slot;
  at::NoGradGuard ng;
  std::unique_ptr<core::ProgressBar> bar;
  if (progress) bar = std::make_unique<core::ProgressBar>("load", static_cast<int64_t>(src.size()), 0, "tensor");
  int64_t done = 0;
  auto weight_of = [&](const std::string& p, const TensorInfo& t) {
    at::Tensor w = gguf_tensor_f32(f, t);
    if (norms.count(p)) w = w - 1.0f;
    if (auto h = qk_heads.find(p); h != qk_heads.end()) w = unpermute_rows(w, h->second);
    if (report) report->tensors.emplace_back(t.name, quant::ggml::gguf_type_name(t.type));
    return w;
  };
  // Pass 2: everything a streamer does not build (biases included, so they are in place for pass 3).
  for (auto& [p, t] : src) {
    if (streamed.count(p)) continue;
    params.at(p).copy_(weight_of(p, *t));
    f.drop_pages(*t);
    if (bar) bar->update(++done);
  }
  int64_t kept = 0;
  // Pass 3: the claimed linears, one at a time: kept as their blocks when the streamer takes them, else
  // dequantized into the model dtype.
  for (auto& [p, slot] : streamed) {
    const TensorInfo& t = *src.at(p);
    const std::string lin = p.substr(0, p.size() - 7);  // minus ".weight"
    auto& dense = static_cast<models::DenseLinear&>(*slot->get());
    std::shared_ptr<models::LinearBase> m;
    if (streamer->build_blocks) {  // offered whatever the type (peft.base gguf keeps floats and refuses the rest)
      at::Tensor blocks = at::from_blob(const_cast<uint8_t*>(f.data(t)),
                                        {t.rows(), static_cast<int64_t>(t.nbytes) / t.rows()}, at::kByte);
      if (auto h = qk_heads.find(p); h != qk_heads.end()) blocks = unpermute_rows(blocks, h->second);
      m = streamer->build_blocks(lin, t.type, blocks, t.ne[0], dense.bias);
      if (m) {
        ++kept;
        if (report) {
          report->kept_packed.push_back(lin);
          report->tensors.emplace_back(t.name, quant::ggml::gguf_type_name(t.type));
        }
      }
    }
    if (!m) {
      at::Tensor w = weight_of(p, t);
      if (!streamer->mapped) w = w.to(dense.weight.scalar_type()).contiguous();
      m = streamer->build(lin, w, dense.bias);
    }
    TORCH_INTERNAL_ASSERT(m && m->in_features == dense.in_features && m->out_features == dense.out_features,
                          "LinearStreamer built a module of the wrong shape for ", lin);
    slot->replace(std::move(m));
    f.drop_pages(t);
    if (bar) bar->update(++done);
  }
  if (bar) bar->finish();
  if (!streamed.empty())
    log::info(o, ": ", kept, " of ", streamed.size(), " streamed linears kept as their llama.cpp blocks (frozen base), ",
              static_cast<int64_t>(streamed.size()) - kept, " built from their dequantized weights");
  for (auto& n : ck.info.notes) log::warn(o, ": ", n);
}

std::shared_ptr<models::CausalLM> load_gguf_model(const std::string& path, models::DType dtype, bool progress,
                                                  const models::LinearStreamer* streamer, GgufLoadReport* report) {
  auto ck = read_gguf(path);
  ck.info.config.dtype = dtype;
  auto m = models::build_model(ck.info.config, /*init=*/false);
  load_gguf_weights(*m, ck, progress, streamer, report);
  return m;
}

}  // namespace qf::exporter
