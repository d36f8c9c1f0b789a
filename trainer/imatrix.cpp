#include "trainer/imatrix.h"

#include <ATen/ATen.h>

#include <chrono>
#include <filesystem>

#include "core/error.h"
#include "core/log.h"
#include "core/safetensors.h"
#include "data/calibration.h"
#include "export/hf_export.h"
#include "export/imatrix_file.h"
#include "models/arch.h"
#include "quant/ptq.h"
#include "trainer/run_dir.h"
#include "trainer/trainer.h"

namespace qf::trainer {

ImatrixResult imatrix_run(const std::string& src, const std::vector<std::string>& overrides, const ImatrixArgs& a) {
  QF_CHECK_INPUT(a.chunks >= 1, "imatrix: --chunks ", a.chunks, " must be at least 1");
  QF_CHECK_INPUT(!is_hf_dir(src) || !a.data.empty(), "imatrix: ", src,
                 " is a Hugging Face checkpoint dir, which names no data; give --data RECIPE.yaml (its data: "
                 "section) or --data TEXT_FILE");
  exporter::check_out(a.out, src, a.force);
  QF_CHECK_INPUT(!std::filesystem::is_directory(a.out), "imatrix: --out '", a.out,
                 "' is a directory; the imatrix is one file (e.g. --out imatrix.gguf)");
  const auto t0 = std::chrono::steady_clock::now();

  auto lr = load_model(src, overrides);
  QF_CHECK_INPUT(lr.meta.format == ModelFormat::Fp && !lr.meta.lora, "imatrix: ", lr.checkpoint, " holds a ", lr.format,
                 " model; the importance matrix is taken from the float model that llama-quantize would quantize");
  set_threads(lr.cfg.run.threads);
  // The calibration text: another recipe's data section, a text file, or the run's own.
  auto dcfg = lr.cfg.data;
  std::string origin = "the run's training split";
  std::vector<std::string> datasets;
  const std::string ext = std::filesystem::path(a.data).extension().string();
  if (ext == ".yaml" || ext == ".yml") {
    auto other = load_run_config(a.data, {"run.init_from="});
    const bool add_bos = dcfg.add_bos;
    dcfg = other.data;
    if (lr.hf_dir) dcfg.add_bos = add_bos;  // BOS as the checkpoint's tokenizer adds it
    origin = "the data of " + a.data;
  } else if (!a.data.empty()) {
    data::SourceConfig s;
    s.path = a.data;
    dcfg.sources = {s};
    dcfg.val_fraction = 0.0;
    origin = a.data;
  }
  if (a.ctx > 0) dcfg.seq_len = a.ctx;
  // llama-imatrix ignores matrix products over fewer than 16 tokens; so a window must have 16.
  QF_CHECK_INPUT(dcfg.seq_len >= 16, "imatrix: windows of ", dcfg.seq_len,
                 " tokens (--ctx, else data.seq_len) are below 16 tokens, which llama.cpp's imatrix collector ignores");
  QF_CHECK_INPUT(dcfg.seq_len <= lr.model->cfg.max_seq_len, "imatrix: windows of ", dcfg.seq_len,
                 " tokens exceed the model's context of ", lr.model->cfg.max_seq_len, "; lower --ctx");
  for (auto& s : dcfg.sources) datasets.push_back(s.path);
  auto ds = data::build_dataset(dcfg, *lr.tok);
  const at::Tensor tokens = data::calibration_tokens(ds.train, a.chunks, origin);
  if (!a.save_tokens.empty()) st::save(a.save_tokens, {{"tokens", tokens}});
  log::info("imatrix: ", tokens.size(0), " windows x ", tokens.size(1), " tokens from ", origin);

  auto& model = *lr.model;
  model.to(pick_device(lr.cfg.trainer.device));
  const auto squares = quant::collect_input_squares(model, tokens, a.batch_size, !log::quiet());

  exporter::Imatrix m;
  m.datasets = datasets;
  m.chunk_count = static_cast<uint32_t>(tokens.size(0));
  m.chunk_size = static_cast<uint32_t>(tokens.size(1));
  for (const auto& [name, gname] : linear_gguf_names(model)) {
    auto it = squares.find(name);
    if (it == squares.end()) continue;
    const auto sums = it->second.sums.to(at::kFloat).contiguous();
    exporter::ImatrixEntry e;
    e.sums.assign(sums.data_ptr<float>(), sums.data_ptr<float>() + sums.numel());
    e.counts = {static_cast<float>(it->second.tokens)};
    m.entries[gname] = std::move(e);
  }
  QF_CHECK(!m.entries.empty(), "imatrix: ", src, " has no decoder linears with llama.cpp tensor names");
  exporter::write_imatrix(a.out, m);
  ImatrixResult r;
  r.out = a.out;
  r.entries = static_cast<int64_t>(m.entries.size());
  r.chunks = tokens.size(0);
  r.ctx = tokens.size(1);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

std::map<std::string, std::string> linear_gguf_names(models::CausalLM& model) {
  const models::ArchSpec& arch = models::arch_spec(model.cfg.family);
  std::map<std::string, std::string> out;
  for (int64_t i = 0; i < model.cfg.n_layers; ++i)
    for (const auto& l : arch.linears)
      if (!l.gguf.empty())
        out[arch.layer_prefix(i) + "." + l.name] = "blk." + std::to_string(i) + "." + l.gguf + ".weight";
  return out;
}

std::map<std::string, at::Tensor> importance_weights(const std::string& path, models::CausalLM& model) {
  const auto m = exporter::read_imatrix(path);
  std::map<std::string, at::Tensor> out;
  std::vector<std::string> missing;
  const auto names = linear_gguf_names(model);
  for (auto& ns : models::linear_slots(model)) {
    auto it = names.find(ns.name);
    if (it == names.end()) continue;
    auto v = m.weights(it->second, ns.slot->get()->in_features, path);
    if (v.empty()) missing.push_back(it->second);
    else out[ns.name] = at::tensor(v);
  }
  QF_CHECK_INPUT(!out.empty(), "imatrix file '", path, "' has no entry for any decoder linear of this model (",
                 m.entries.size(), " entries, e.g. '", m.entries.empty() ? "" : m.entries.begin()->first, "')");
  if (!missing.empty())
    log::warn("imatrix: ", path, " has no weights for ", missing.size(), " linear(s) (first: ", missing[0],
              "); they are rounded without, as llama-quantize does");
  return out;
}

}  // namespace qf::trainer
