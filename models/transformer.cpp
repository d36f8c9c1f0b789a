#include "models/transformer.h"

#include <ATen/ATen.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>

#include <cmath>

#include "core/error.h"
#include "core/strings.h"
#include "models/arch.h"
#include "models/checkpoint.h"

namespace qf::models {
namespace {

at::ScalarType model_dtype(const ModelConfig& c) { return c.dtype == DType::BF16 ? at::kBFloat16 : at::kFloat; }

// Module names come from the family's architecture spec (models/arch.h), never spelled here.
const ArchSpec& spec(const ModelConfig& c) { return arch_spec(c.family); }
// A layer linear's path "<parent>.<leaf>" -> the parent module's / the leaf's name, by role.
std::string parent_of(const ArchSpec& a, TensorRole r) { return split_last(a.linear(r).name).first; }
std::string leaf_of(const ArchSpec& a, TensorRole r) { return split_last(a.linear(r).name).second; }
std::string leaf(const std::string& path) { return split_last(path).second; }
LinearSlot* find_slot(const std::string& n, std::initializer_list<LinearSlot*> slots) {
  for (auto* s : slots)
    if (s->name() == n) return s;
  return nullptr;
}

// RMSNorm as in HF LlamaRMSNorm: normalise in fp32, cast back, then scale.
// gemma = true: Gemma's RMSNorm, whose stored weight w scales by (1 + w), all in fp32, then cast.
class RMSNorm : public torch::nn::Module {
 public:
  RMSNorm(int64_t dim, double eps, bool gemma = false) : eps_(eps), gemma_(gemma) {
    weight = register_parameter("weight", gemma ? at::zeros({dim}) : at::ones({dim}));
  }
  at::Tensor forward(const at::Tensor& x) {
    auto xf = x.to(at::kFloat);
    auto y = xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps_);
    if (gemma_) return (y * (1.0 + weight.to(at::kFloat))).to(x.scalar_type());
    return weight * y.to(x.scalar_type());
  }
  at::Tensor weight;

 private:
  double eps_;
  bool gemma_;
};

class LayerNorm : public torch::nn::Module {
 public:
  LayerNorm(int64_t dim, double eps) : dim_(dim), eps_(eps) {
    weight = register_parameter("weight", at::ones({dim}));
    bias = register_parameter("bias", at::zeros({dim}));
  }
  at::Tensor forward(const at::Tensor& x) { return at::layer_norm(x, {dim_}, weight, bias, eps_); }
  at::Tensor weight, bias;

 private:
  int64_t dim_;
  double eps_;
};

// Attention over q [B,H,T,D], k/v [B,Hkv,T,D], appending k/v to the cache when given. window > 0:
// query at absolute position p sees keys at positions (p - window, p] (transformers' sliding window).
// scale > 0 replaces 1/sqrt(head_dim); softcap > 0 caps the scores as softcap * tanh(s / softcap)
// before the mask (Gemma 2), which needs the explicit softmax below instead of SDPA.
struct AttnOpts {
  int64_t n_rep = 1, window = 0;
  double scale = 0.0, softcap = 0.0;
};
at::Tensor sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                bool causal, const AttnOpts& o) {
  const std::optional<double> scale = o.scale > 0 ? std::optional<double>(o.scale) : std::nullopt;
  if (o.softcap <= 0) return at::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale);
  auto s = at::matmul(q, k.transpose(-2, -1)) * (o.scale > 0 ? o.scale : 1.0 / std::sqrt(double(q.size(-1))));
  s = at::tanh(s / o.softcap) * o.softcap;
  at::Tensor allowed;
  if (mask) allowed = *mask;
  else if (causal) allowed = at::ones({q.size(-2), k.size(-2)}, q.options().dtype(at::kBool)).tril();
  if (allowed.defined()) s = s.masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());
  return at::matmul(at::softmax(s, -1, at::kFloat).to(q.scalar_type()), v);
}

at::Tensor attend(at::Tensor q, at::Tensor k, at::Tensor v, KVCache* cache, int layer, const AttnOpts& o) {
  const int64_t n_rep = o.n_rep, window = o.window;
  const int64_t T = q.size(2);
  int64_t past = 0;
  if (cache) {
    past = cache->length;
    QF_CHECK(past + T <= cache->capacity, "KV cache overflow: ", past, " + ", T, " > capacity ", cache->capacity);
    cache->k[layer].narrow(2, past, T).copy_(k);
    cache->v[layer].narrow(2, past, T).copy_(v);
    k = cache->k[layer].narrow(2, 0, past + T);
    v = cache->v[layer].narrow(2, 0, past + T);
  }
  if (n_rep > 1) {
    k = k.repeat_interleave(n_rep, 1);
    v = v.repeat_interleave(n_rep, 1);
  }
  const bool windowed = window > 0 && past + T > window;
  if (past == 0 && !windowed) return sdpa(q, k, v, std::nullopt, /*causal=*/true, o);
  if (T == 1 && !windowed) return sdpa(q, k, v, std::nullopt, false, o);
  // Query i (absolute position past+i) sees keys j <= past+i (and j > past+i-window).
  auto qi = at::arange(T, q.options().dtype(at::kLong)).unsqueeze(1) + past;
  auto kj = at::arange(past + T, q.options().dtype(at::kLong)).unsqueeze(0);
  auto mask = kj <= qi;
  if (windowed) mask = mask & (kj > qi - window);
  return sdpa(q, k, v, mask, false, o);
}

class LlamaAttention : public torch::nn::Module, public HasLinearSlots {
 public:
  explicit LlamaAttention(const ModelConfig& c) : c_(c) {
    int64_t hd = c.hdim();
    const ArchSpec& a = spec(c);
    if (a.fused_qkv) {  // one projection, rows [q; k; v] (Phi-3's qkv_proj)
      wqkv = LinearSlot(this, leaf_of(a, TensorRole::AttnQkv),
                        std::make_shared<DenseLinear>(c.dim, (c.n_heads + 2 * c.kv_heads()) * hd, c.qkv_bias));
    } else {
      wq = LinearSlot(this, leaf_of(a, TensorRole::AttnQ), std::make_shared<DenseLinear>(c.dim, c.n_heads * hd, c.qkv_bias));
      wk = LinearSlot(this, leaf_of(a, TensorRole::AttnK), std::make_shared<DenseLinear>(c.dim, c.kv_heads() * hd, c.qkv_bias));
      wv = LinearSlot(this, leaf_of(a, TensorRole::AttnV), std::make_shared<DenseLinear>(c.dim, c.kv_heads() * hd, c.qkv_bias));
    }
    wo = LinearSlot(this, leaf_of(a, TensorRole::AttnOutput), std::make_shared<DenseLinear>(c.n_heads * hd, c.dim, false));
    if (c.qk_norm) {
      q_norm = register_module(leaf(a.layer_module("attn_q_norm.weight")), std::make_shared<RMSNorm>(hd, c.norm_eps, a.gemma_norms));
      k_norm = register_module(leaf(a.layer_module("attn_k_norm.weight")), std::make_shared<RMSNorm>(hd, c.norm_eps, a.gemma_norms));
    }
  }
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, KVCache* cache, int layer) {
    const int64_t B = x.size(0), T = x.size(1), hd = c_.hdim();
    at::Tensor q, k, v;
    if (wqkv.get()) {
      auto qkv = wqkv(x).split_with_sizes({c_.n_heads * hd, c_.kv_heads() * hd, c_.kv_heads() * hd}, -1);
      q = qkv[0], k = qkv[1], v = qkv[2];
    } else {
      q = wq(x), k = wk(x), v = wv(x);
    }
    q = q.view({B, T, c_.n_heads, hd});
    k = k.view({B, T, c_.kv_heads(), hd});
    if (q_norm) {
      q = q_norm->forward(q);
      k = k_norm->forward(k);
    }
    q = apply_rope(q.transpose(1, 2), cos, sin);
    k = apply_rope(k.transpose(1, 2), cos, sin);
    v = v.view({B, T, c_.kv_heads(), hd}).transpose(1, 2);
    AttnOpts o;
    o.n_rep = c_.n_heads / c_.kv_heads();
    o.window = c_.window(layer);
    o.scale = c_.query_pre_attn_scalar > 0 ? 1.0 / std::sqrt(c_.query_pre_attn_scalar) : 0.0;
    o.softcap = c_.attn_softcap;
    auto y = attend(q, k, v, cache, layer, o);
    return wo(y.transpose(1, 2).reshape({B, T, c_.n_heads * hd}));
  }
  LinearSlot* linear_slot(const std::string& n) override { return find_slot(n, {&wq, &wk, &wv, &wqkv, &wo}); }
  LinearSlot wq, wk, wv, wqkv, wo;
  std::shared_ptr<RMSNorm> q_norm, k_norm;  // qk_norm only

 private:
  ModelConfig c_;
};

class LlamaMLP : public torch::nn::Module, public HasLinearSlots {
 public:
  explicit LlamaMLP(const ModelConfig& c) : act_(spec(c).mlp_act) {
    const ArchSpec& a = spec(c);
    if (a.fused_gate_up) {  // one projection, rows [gate; up] (Phi-3's gate_up_proj)
      w_up = LinearSlot(this, leaf_of(a, TensorRole::FfnUp), std::make_shared<DenseLinear>(c.dim, 2 * c.ffn(), false));
    } else {
      w_gate = LinearSlot(this, leaf_of(a, TensorRole::FfnGate), std::make_shared<DenseLinear>(c.dim, c.ffn(), false));
      w_up = LinearSlot(this, leaf_of(a, TensorRole::FfnUp), std::make_shared<DenseLinear>(c.dim, c.ffn(), false));
    }
    w_down = LinearSlot(this, leaf_of(a, TensorRole::FfnDown), std::make_shared<DenseLinear>(c.ffn(), c.dim, false));
  }
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor g, u;
    if (w_gate.get()) {
      g = w_gate(x), u = w_up(x);
    } else {
      auto gu = w_up(x).chunk(2, -1);
      g = gu[0], u = gu[1];
    }
    return w_down((act_ == Activation::Silu ? at::silu(g) : at::gelu(g, "tanh")) * u);
  }
  LinearSlot* linear_slot(const std::string& n) override { return find_slot(n, {&w_gate, &w_up, &w_down}); }
  LinearSlot w_gate, w_up, w_down;

 private:
  Activation act_;
};

class LlamaLayer : public torch::nn::Module {
 public:
  explicit LlamaLayer(const ModelConfig& c) {
    const ArchSpec& a = spec(c);
    auto norm = [&](const char* gguf) {
      return register_module(a.layer_module(gguf), std::make_shared<RMSNorm>(c.dim, c.norm_eps, a.gemma_norms));
    };
    attn_norm = norm("attn_norm.weight");
    attn = register_module(parent_of(a, TensorRole::AttnOutput), std::make_shared<LlamaAttention>(c));
    if (a.sandwich_norms) attn_post_norm = norm("post_attention_norm.weight");
    ffn_norm = norm("ffn_norm.weight");
    mlp = register_module(parent_of(a, TensorRole::FfnDown), std::make_shared<LlamaMLP>(c));
    if (a.sandwich_norms) ffn_post_norm = norm("post_ffw_norm.weight");
  }
  // Pre-norm residual blocks; with sandwich norms (Gemma 2/3) each block's output is normed too.
  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, KVCache* cache, int layer) {
    auto h = attn->forward(attn_norm->forward(x), cos, sin, cache, layer);
    x = x + (attn_post_norm ? attn_post_norm->forward(h) : h);
    h = mlp->forward(ffn_norm->forward(x));
    return x + (ffn_post_norm ? ffn_post_norm->forward(h) : h);
  }
  std::shared_ptr<RMSNorm> attn_norm, ffn_norm, attn_post_norm, ffn_post_norm;
  std::shared_ptr<LlamaAttention> attn;
  std::shared_ptr<LlamaMLP> mlp;
};

// The HF "model." prefix: embeddings, layers, final norm.
class LlamaBody : public torch::nn::Module {
 public:
  explicit LlamaBody(const ModelConfig& c) {
    const ArchSpec& a = spec(c);
    embed_tokens = EmbeddingSlot(this, leaf(a.embed), std::make_shared<DenseEmbedding>(c.vocab_size, c.dim));
    layers = register_module(leaf(a.layers), torch::nn::ModuleList());
    for (int64_t i = 0; i < c.n_layers; ++i) {
      auto l = std::make_shared<LlamaLayer>(c);
      layers->push_back(l);
      layer_ptrs.push_back(l);
    }
    norm = register_module(leaf(a.final_norm), std::make_shared<RMSNorm>(c.dim, c.norm_eps, a.gemma_norms));
  }
  EmbeddingSlot embed_tokens;
  torch::nn::ModuleList layers{nullptr};
  std::vector<std::shared_ptr<LlamaLayer>> layer_ptrs;
  std::shared_ptr<RMSNorm> norm;
};

class LlamaForCausalLM : public CausalLM, public HasLinearSlots {
 public:
  explicit LlamaForCausalLM(const ModelConfig& c) : CausalLM(c) {
    model = register_module(split_last(spec(c).layers).first, std::make_shared<LlamaBody>(c));
    if (!c.tie_embeddings) lm_head = LinearSlot(this, spec(c).lm_head, std::make_shared<DenseLinear>(c.dim, c.vocab_size, false));
  }
  at::Tensor hidden(const at::Tensor& ids, KVCache* cache) override {
    QF_CHECK(ids.dim() == 2, "input_ids must be [batch, seq], got ", ids.sizes());
    const int64_t T = ids.size(1), start = cache ? cache->length : 0;
    QF_CHECK(start + T <= cfg.max_seq_len, "sequence of ", start + T, " tokens exceeds model.max_seq_len ", cfg.max_seq_len);
    auto x = embed_table(model->embed_tokens.get()->table(), ids);
    Rope rope(cfg, start, T, x.options());
    for (size_t i = 0; i < model->layer_ptrs.size(); ++i) {
      // Captured by value: a checkpointed layer calls this again in backward, after hidden() returned.
      const auto& cs = rope.of(static_cast<int64_t>(i));
      auto blk = model->layer_ptrs[i];
      x = run_layer(static_cast<int64_t>(i), *blk, x, cache != nullptr,
                    [blk, cos = cs.first, sin = cs.second, cache, i](const at::Tensor& xi) {
                      return blk->forward(xi, cos, sin, cache, static_cast<int>(i));
                    });
    }
    x = model->norm->forward(x);
    if (cache) cache->length += T;
    return x;
  }
  at::Tensor logits(const at::Tensor& h) override {
    auto y = cfg.tie_embeddings ? at::linear(h, model->embed_tokens.get()->table()) : lm_head(h);
    // Final logit soft-capping (Gemma 2).
    if (cfg.final_softcap > 0) y = at::tanh(y / cfg.final_softcap) * cfg.final_softcap;
    return y;
  }
  torch::nn::Module& head_module() override {
    return cfg.tie_embeddings ? static_cast<torch::nn::Module&>(*model->embed_tokens.get()) : *lm_head.get();
  }
  EmbeddingSlot& token_embedding() override { return model->embed_tokens; }
  std::string token_embedding_name() const override { return spec(cfg).embed; }
  at::Tensor embed(const at::Tensor& ids) override { return embed_table(model->embed_tokens.get()->table(), ids); }
  at::Tensor layer_forward(int64_t i, const at::Tensor& x) override {
    Rope rope(cfg, 0, x.size(1), x.options());
    const auto& [cos, sin] = rope.of(i);
    return model->layer_ptrs.at(i)->forward(x, cos, sin, nullptr, static_cast<int>(i));
  }
  at::Tensor head_input(const at::Tensor& x) override { return model->norm->forward(x); }
  // Token embeddings, times sqrt(hidden) in the model dtype where the family scales them (Gemma).
  at::Tensor embed_table(const at::Tensor& table, const at::Tensor& ids) const {
    auto x = at::embedding(table, ids);
    if (!spec(cfg).scale_embeddings) return x;
    return x * at::scalar_tensor(std::sqrt(static_cast<double>(cfg.dim)), x.options().dtype(x.scalar_type()));
  }
  // cos/sin per layer: global layers use rope_theta (+ scaling); windowed layers use
  // rope_local_theta without scaling where the family has one (Gemma 3).
  struct Rope {
    Rope(const ModelConfig& c, int64_t start, int64_t T, const at::TensorOptions& opts) : c_(c) {
      global = rope_cos_sin(c, start, T, opts);
      if (c.rope_local_theta > 0) {
        ModelConfig lc = c;
        lc.rope_theta = c.rope_local_theta;
        lc.rope_scaling = RopeScaling::None;
        local = rope_cos_sin(lc, start, T, opts);
      }
    }
    const std::pair<at::Tensor, at::Tensor>& of(int64_t layer) const {
      return c_.rope_local_theta > 0 && c_.window(layer) > 0 ? local : global;
    }
    const ModelConfig& c_;
    std::pair<at::Tensor, at::Tensor> global, local;
  };
  torch::nn::Module& layer(int64_t i) override { return *model->layer_ptrs.at(i); }
  std::string layer_prefix(int64_t i) const override { return spec(cfg).layer_prefix(i); }
  LinearSlot* linear_slot(const std::string& n) override { return lm_head.get() ? find_slot(n, {&lm_head}) : nullptr; }
  std::shared_ptr<LlamaBody> model;
  LinearSlot lm_head;
};

// ---------------- GPT-2 ----------------
class Gpt2Attention : public torch::nn::Module, public HasLinearSlots {
 public:
  explicit Gpt2Attention(const ModelConfig& c) : c_(c) {
    const ArchSpec& a = spec(c);
    c_attn = LinearSlot(this, leaf_of(a, TensorRole::AttnQkv), std::make_shared<DenseLinear>(c.dim, 3 * c.dim, true));
    c_proj = LinearSlot(this, leaf_of(a, TensorRole::AttnOutput), std::make_shared<DenseLinear>(c.dim, c.dim, true));
  }
  at::Tensor forward(const at::Tensor& x, KVCache* cache, int layer) {
    const int64_t B = x.size(0), T = x.size(1), H = c_.n_heads, hd = c_.hdim();
    auto qkv = c_attn(x).split(c_.dim, -1);
    auto q = qkv[0].view({B, T, H, hd}).transpose(1, 2);
    auto k = qkv[1].view({B, T, H, hd}).transpose(1, 2);
    auto v = qkv[2].view({B, T, H, hd}).transpose(1, 2);
    auto y = attend(q, k, v, cache, layer, AttnOpts{});
    return c_proj(y.transpose(1, 2).reshape({B, T, c_.dim}));
  }
  LinearSlot* linear_slot(const std::string& n) override { return find_slot(n, {&c_attn, &c_proj}); }
  LinearSlot c_attn, c_proj;

 private:
  ModelConfig c_;
};

class Gpt2MLP : public torch::nn::Module, public HasLinearSlots {
 public:
  explicit Gpt2MLP(const ModelConfig& c) {
    const ArchSpec& a = spec(c);
    c_fc = LinearSlot(this, leaf_of(a, TensorRole::FfnUp), std::make_shared<DenseLinear>(c.dim, c.ffn(), true));
    c_proj = LinearSlot(this, leaf_of(a, TensorRole::FfnDown), std::make_shared<DenseLinear>(c.ffn(), c.dim, true));
  }
  at::Tensor forward(const at::Tensor& x) { return c_proj(at::gelu(c_fc(x), "tanh")); }
  LinearSlot* linear_slot(const std::string& n) override { return find_slot(n, {&c_fc, &c_proj}); }
  LinearSlot c_fc, c_proj;
};

class Gpt2Block : public torch::nn::Module {
 public:
  explicit Gpt2Block(const ModelConfig& c) {
    const ArchSpec& a = spec(c);
    ln_1 = register_module(a.layer_module("attn_norm.weight"), std::make_shared<LayerNorm>(c.dim, c.norm_eps));
    attn = register_module(parent_of(a, TensorRole::AttnQkv), std::make_shared<Gpt2Attention>(c));
    ln_2 = register_module(a.layer_module("ffn_norm.weight"), std::make_shared<LayerNorm>(c.dim, c.norm_eps));
    mlp = register_module(parent_of(a, TensorRole::FfnUp), std::make_shared<Gpt2MLP>(c));
  }
  at::Tensor forward(at::Tensor x, KVCache* cache, int layer) {
    x = x + attn->forward(ln_1->forward(x), cache, layer);
    return x + mlp->forward(ln_2->forward(x));
  }
  std::shared_ptr<LayerNorm> ln_1, ln_2;
  std::shared_ptr<Gpt2Attention> attn;
  std::shared_ptr<Gpt2MLP> mlp;
};

class Gpt2Body : public torch::nn::Module {
 public:
  explicit Gpt2Body(const ModelConfig& c) {
    const ArchSpec& a = spec(c);
    wte = EmbeddingSlot(this, leaf(a.embed), std::make_shared<DenseEmbedding>(c.vocab_size, c.dim));
    wpe = register_module(leaf(a.positions), torch::nn::Embedding(c.max_seq_len, c.dim));
    h = register_module(leaf(a.layers), torch::nn::ModuleList());
    for (int64_t i = 0; i < c.n_layers; ++i) {
      auto b = std::make_shared<Gpt2Block>(c);
      h->push_back(b);
      blocks.push_back(b);
    }
    ln_f = register_module(leaf(a.final_norm), std::make_shared<LayerNorm>(c.dim, c.norm_eps));
  }
  EmbeddingSlot wte;
  torch::nn::Embedding wpe{nullptr};
  torch::nn::ModuleList h{nullptr};
  std::vector<std::shared_ptr<Gpt2Block>> blocks;
  std::shared_ptr<LayerNorm> ln_f;
};

class Gpt2LMHeadModel : public CausalLM {
 public:
  explicit Gpt2LMHeadModel(const ModelConfig& c) : CausalLM(c) {
    transformer = register_module(split_last(spec(c).layers).first, std::make_shared<Gpt2Body>(c));
  }
  at::Tensor hidden(const at::Tensor& ids, KVCache* cache) override {
    QF_CHECK(ids.dim() == 2, "input_ids must be [batch, seq], got ", ids.sizes());
    const int64_t T = ids.size(1), start = cache ? cache->length : 0;
    QF_CHECK(start + T <= cfg.max_seq_len, "sequence of ", start + T, " tokens exceeds model.max_seq_len ", cfg.max_seq_len);
    auto pos = at::arange(start, start + T, ids.options());
    auto x = at::embedding(transformer->wte.get()->table(), ids) + transformer->wpe->forward(pos).unsqueeze(0);
    for (size_t i = 0; i < transformer->blocks.size(); ++i) {
      auto blk = transformer->blocks[i];  // by value: see LlamaForCausalLM::hidden
      x = run_layer(static_cast<int64_t>(i), *blk, x, cache != nullptr,
                    [blk, cache, i](const at::Tensor& xi) { return blk->forward(xi, cache, static_cast<int>(i)); });
    }
    x = transformer->ln_f->forward(x);
    if (cache) cache->length += T;
    return x;
  }
  at::Tensor logits(const at::Tensor& h) override { return at::linear(h, transformer->wte.get()->table()); }
  torch::nn::Module& head_module() override { return *transformer->wte.get(); }
  EmbeddingSlot& token_embedding() override { return transformer->wte; }
  std::string token_embedding_name() const override { return spec(cfg).embed; }
  at::Tensor embed(const at::Tensor& ids) override {
    auto pos = at::arange(0, ids.size(1), ids.options());
    return at::embedding(transformer->wte.get()->table(), ids) + transformer->wpe->forward(pos).unsqueeze(0);
  }
  at::Tensor layer_forward(int64_t i, const at::Tensor& x) override {
    return transformer->blocks.at(i)->forward(x, nullptr, static_cast<int>(i));
  }
  at::Tensor head_input(const at::Tensor& x) override { return transformer->ln_f->forward(x); }
  torch::nn::Module& layer(int64_t i) override { return *transformer->blocks.at(i); }
  std::string layer_prefix(int64_t i) const override { return spec(cfg).layer_prefix(i); }
  std::shared_ptr<Gpt2Body> transformer;
};

// ---------------- OPT ----------------
// Learned positions at offset 2, pre- (or post-, do_layer_norm_before = false) LayerNorm, ReLU MLP,
// biases everywhere, optional project_in/project_out around the decoder when the embedding width
// differs from the hidden size; lm_head tied to the embedding.
class OptAttention : public torch::nn::Module, public HasLinearSlots {
 public:
  explicit OptAttention(const ModelConfig& c) : c_(c) {
    const ArchSpec& a = spec(c);
    for (auto [slot, role] : {std::pair{&wq, TensorRole::AttnQ}, {&wk, TensorRole::AttnK}, {&wv, TensorRole::AttnV},
                              {&wo, TensorRole::AttnOutput}})
      *slot = LinearSlot(this, leaf_of(a, role), std::make_shared<DenseLinear>(c.dim, c.dim, true));
  }
  at::Tensor forward(const at::Tensor& x, KVCache* cache, int layer) {
    const int64_t B = x.size(0), T = x.size(1), H = c_.n_heads, hd = c_.hdim();
    auto q = wq(x).view({B, T, H, hd}).transpose(1, 2);
    auto k = wk(x).view({B, T, H, hd}).transpose(1, 2);
    auto v = wv(x).view({B, T, H, hd}).transpose(1, 2);
    auto y = attend(q, k, v, cache, layer, AttnOpts{});
    return wo(y.transpose(1, 2).reshape({B, T, c_.dim}));
  }
  LinearSlot* linear_slot(const std::string& n) override { return find_slot(n, {&wq, &wk, &wv, &wo}); }
  LinearSlot wq, wk, wv, wo;

 private:
  ModelConfig c_;
};

class OptLayer : public torch::nn::Module, public HasLinearSlots {
 public:
  explicit OptLayer(const ModelConfig& c) : post_norm_(c.post_norm) {
    const ArchSpec& a = spec(c);
    attn_norm = register_module(a.layer_module("attn_norm.weight"), std::make_shared<LayerNorm>(c.dim, c.norm_eps));
    attn = register_module(parent_of(a, TensorRole::AttnOutput), std::make_shared<OptAttention>(c));
    ffn_norm = register_module(a.layer_module("ffn_norm.weight"), std::make_shared<LayerNorm>(c.dim, c.norm_eps));
    fc1 = LinearSlot(this, a.linear(TensorRole::FfnUp).name, std::make_shared<DenseLinear>(c.dim, c.ffn(), true));
    fc2 = LinearSlot(this, a.linear(TensorRole::FfnDown).name, std::make_shared<DenseLinear>(c.ffn(), c.dim, true));
  }
  at::Tensor forward(at::Tensor x, KVCache* cache, int layer) {
    if (post_norm_) {
      x = attn_norm->forward(x + attn->forward(x, cache, layer));
      return ffn_norm->forward(x + fc2(at::relu(fc1(x))));
    }
    x = x + attn->forward(attn_norm->forward(x), cache, layer);
    return x + fc2(at::relu(fc1(ffn_norm->forward(x))));
  }
  LinearSlot* linear_slot(const std::string& n) override { return find_slot(n, {&fc1, &fc2}); }
  std::shared_ptr<LayerNorm> attn_norm, ffn_norm;
  std::shared_ptr<OptAttention> attn;
  LinearSlot fc1, fc2;

 private:
  bool post_norm_;
};

class OptDecoder : public torch::nn::Module {
 public:
  explicit OptDecoder(const ModelConfig& c) {
    const ArchSpec& a = spec(c);
    const int64_t e = c.embed_width();
    embed_tokens = EmbeddingSlot(this, leaf(a.embed), std::make_shared<DenseEmbedding>(c.vocab_size, e));
    embed_positions = register_module(leaf(a.positions), torch::nn::Embedding(c.max_seq_len + 2, c.dim));
    if (e != c.dim) {
      project_in = register_module(leaf(a.optional_modules.at(0)), std::make_shared<DenseLinear>(e, c.dim, false));
      project_out = register_module(leaf(a.optional_modules.at(1)), std::make_shared<DenseLinear>(c.dim, e, false));
    }
    layers = register_module(leaf(a.layers), torch::nn::ModuleList());
    for (int64_t i = 0; i < c.n_layers; ++i) {
      auto l = std::make_shared<OptLayer>(c);
      layers->push_back(l);
      layer_ptrs.push_back(l);
    }
    if (!c.post_norm) final_norm = register_module(leaf(a.final_norm), std::make_shared<LayerNorm>(c.dim, c.norm_eps));
  }
  EmbeddingSlot embed_tokens;
  torch::nn::Embedding embed_positions{nullptr};
  std::shared_ptr<DenseLinear> project_in, project_out;
  torch::nn::ModuleList layers{nullptr};
  std::vector<std::shared_ptr<OptLayer>> layer_ptrs;
  std::shared_ptr<LayerNorm> final_norm;
};

class OptForCausalLM : public CausalLM {
 public:
  explicit OptForCausalLM(const ModelConfig& c) : CausalLM(c) {
    // "model.decoder": two levels above the layers.
    auto outer = split_last(split_last(spec(c).layers).first);
    model = register_module(outer.first, std::make_shared<torch::nn::Module>());
    decoder = model->register_module(outer.second, std::make_shared<OptDecoder>(c));
  }
  at::Tensor hidden(const at::Tensor& ids, KVCache* cache) override {
    QF_CHECK(ids.dim() == 2, "input_ids must be [batch, seq], got ", ids.sizes());
    const int64_t T = ids.size(1), start = cache ? cache->length : 0;
    QF_CHECK(start + T <= cfg.max_seq_len, "sequence of ", start + T, " tokens exceeds model.max_seq_len ", cfg.max_seq_len);
    auto x = embed_at(ids, start);
    for (size_t i = 0; i < decoder->layer_ptrs.size(); ++i) {
      auto blk = decoder->layer_ptrs[i];  // by value: see LlamaForCausalLM::hidden
      x = run_layer(static_cast<int64_t>(i), *blk, x, cache != nullptr,
                    [blk, cache, i](const at::Tensor& xi) { return blk->forward(xi, cache, static_cast<int>(i)); });
    }
    if (cache) cache->length += T;
    if (decoder->final_norm) x = decoder->final_norm->forward(x);
    if (decoder->project_out) x = decoder->project_out->forward(x);
    return x;
  }
  at::Tensor logits(const at::Tensor& h) override { return at::linear(h, decoder->embed_tokens.get()->table()); }
  torch::nn::Module& head_module() override { return *decoder->embed_tokens.get(); }
  // Token embeddings (projected in) plus the learned positions, which start at row 2.
  at::Tensor embed_at(const at::Tensor& ids, int64_t start) {
    auto x = at::embedding(decoder->embed_tokens.get()->table(), ids);
    if (decoder->project_in) x = decoder->project_in->forward(x);
    auto pos = at::arange(start + 2, start + 2 + ids.size(1), ids.options());
    return x + decoder->embed_positions->forward(pos).unsqueeze(0);
  }
  EmbeddingSlot& token_embedding() override { return decoder->embed_tokens; }
  std::string token_embedding_name() const override { return spec(cfg).embed; }
  at::Tensor embed(const at::Tensor& ids) override { return embed_at(ids, 0); }
  at::Tensor layer_forward(int64_t i, const at::Tensor& x) override {
    return decoder->layer_ptrs.at(i)->forward(x, nullptr, static_cast<int>(i));
  }
  at::Tensor head_input(const at::Tensor& x) override {
    auto y = decoder->final_norm ? decoder->final_norm->forward(x) : x;
    return decoder->project_out ? decoder->project_out->forward(y) : y;
  }
  torch::nn::Module& layer(int64_t i) override { return *decoder->layer_ptrs.at(i); }
  std::string layer_prefix(int64_t i) const override { return spec(cfg).layer_prefix(i); }
  std::shared_ptr<torch::nn::Module> model;
  std::shared_ptr<OptDecoder> decoder;
};

}  // namespace

at::Tensor CausalLM::run_layer(int64_t i, torch::nn::Module& mod, const at::Tensor& x, bool cached,
                               const std::function<at::Tensor(const at::Tensor&)>& fn) {
  if (checkpoint_every <= 0 || cached || !is_training() || !at::GradMode::is_enabled() || i % checkpoint_every != 0)
    return fn(x);
  return checkpoint(fn, x, mod.parameters());
}

at::Tensor rope_inv_freq(const ModelConfig& c, int64_t seq_len) {
  // float32 throughout, in the same order of operations as transformers' rope init functions,
  // so cos/sin tables agree bit-for-bit at large positions.
  const int64_t D = c.rotary_dim();
  auto idx = at::arange(0, D, 2, at::kLong).to(at::kFloat) / static_cast<double>(D);
  if (c.rope_scaling == RopeScaling::LongRope) {
    const auto& f = seq_len > c.rope_original_max_seq_len ? c.rope_long_factor : c.rope_short_factor;
    QF_CHECK(static_cast<int64_t>(f.size()) == D / 2, "longrope needs ", D / 2, " factors, has ", f.size());
    auto ext = at::tensor(std::vector<float>(f.begin(), f.end()), at::kFloat);
    return 1.0 / (ext * at::pow(c.rope_theta, idx));
  }
  auto inv = 1.0 / at::pow(c.rope_theta, idx);
  if (c.rope_scaling == RopeScaling::Linear) {
    inv = inv / c.rope_factor;
  } else if (c.rope_scaling == RopeScaling::Llama3) {
    const double f = c.rope_factor, lo = c.rope_low_freq_factor, hi = c.rope_high_freq_factor;
    const double old = static_cast<double>(c.rope_original_max_seq_len);
    const double low_wl = old / lo, high_wl = old / hi;
    auto wl = 2.0 * M_PI / inv;
    auto scaled = at::where(wl > low_wl, inv / f, inv);
    auto smooth = (old / wl - lo) / (hi - lo);
    auto smoothed = (1.0 - smooth) * scaled / f + smooth * scaled;
    auto medium = at::logical_not(wl < high_wl) & at::logical_not(wl > low_wl);
    inv = at::where(medium, smoothed, scaled);
  }
  return inv;
}

double rope_attention_scale(const ModelConfig& c) {
  if (c.rope_scaling != RopeScaling::LongRope) return 1.0;
  if (c.rope_attention_factor > 0) return c.rope_attention_factor;
  const double factor = static_cast<double>(c.max_seq_len) / static_cast<double>(c.rope_original_max_seq_len);
  if (factor <= 1.0) return 1.0;
  return std::sqrt(1.0 + std::log(factor) / std::log(static_cast<double>(c.rope_original_max_seq_len)));
}

std::pair<at::Tensor, at::Tensor> rope_cos_sin(const ModelConfig& c, int64_t start, int64_t T,
                                               const at::TensorOptions& opts) {
  auto inv = rope_inv_freq(c, start + T).to(opts.device());
  auto pos = at::arange(start, start + T, at::TensorOptions().dtype(at::kFloat).device(opts.device()));
  auto freqs = at::outer(pos, inv);
  auto emb = at::cat({freqs, freqs}, -1);
  const double s = rope_attention_scale(c);
  if (s != 1.0) return {(emb.cos() * s).to(opts.dtype()), (emb.sin() * s).to(opts.dtype())};
  return {emb.cos().to(opts.dtype()), emb.sin().to(opts.dtype())};
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t R = cos.size(-1);
  if (R < x.size(-1))
    return at::cat({apply_rope(x.narrow(-1, 0, R), cos, sin), x.narrow(-1, R, x.size(-1) - R)}, -1);
  const int64_t h = x.size(-1) / 2;
  auto x1 = x.narrow(-1, 0, h), x2 = x.narrow(-1, h, h);
  auto rot = at::cat({-x2, x1}, -1);
  return x * cos + rot * sin;
}

KVCache CausalLM::make_cache(int64_t batch, int64_t capacity) const {
  KVCache kv;
  kv.capacity = std::min(capacity, cfg.max_seq_len);
  auto p = const_cast<CausalLM*>(this)->parameters();
  auto opts = p.front().options();
  for (int64_t i = 0; i < cfg.n_layers; ++i) {
    kv.k.push_back(at::zeros({batch, cfg.kv_heads(), kv.capacity, cfg.hdim()}, opts));
    kv.v.push_back(at::zeros({batch, cfg.kv_heads(), kv.capacity, cfg.hdim()}, opts));
  }
  return kv;
}

void CausalLM::init_weights(uint64_t seed) {
  at::NoGradGuard ng;
  auto gen = at::detail::createCPUGenerator(seed);
  const double proj_std = cfg.init_std / std::sqrt(2.0 * cfg.n_layers);
  const ArchSpec& a = spec(cfg);
  for (auto& p : named_parameters()) {
    const std::string& n = p.key();
    at::Tensor t = p.value();
    auto tmp = at::empty(t.sizes(), at::kFloat);
    if (t.dim() == 1) {
      // norms: weight 1 (0 for Gemma's, which scale by 1 + w), bias 0; linear biases 0
      tmp.fill_(ends_with(n, ".bias") || a.gemma_norms ? 0.0 : 1.0);
    } else {
      // GPT-2 scales residual projections by 1/sqrt(2 * n_layers), as HF's GPT2PreTrainedModel does.
      const ArchLinear* l = a.layer_linear_of(n);
      const bool resid = a.scaled_residual_init && l && l->residual;
      tmp.normal_(0.0, resid ? proj_std : cfg.init_std, gen);
    }
    t.copy_(tmp);
  }
}

int64_t CausalLM::num_parameters() const {
  int64_t n = 0;
  for (auto& p : parameters()) n += p.numel();
  return n;
}

std::shared_ptr<CausalLM> build_model(const ModelConfig& c, bool init) {
  QF_CHECK(c.vocab_size > 0, "model.vocab_size must be set (or taken from the tokenizer) before building");
  std::shared_ptr<CausalLM> m;
  // Without init the parameters are allocated directly in the model dtype and left untouched (the
  // pages are not even faulted in), for callers that load every weight right after.
  const auto saved = c10::get_default_dtype();
  if (!init) c10::set_default_dtype(c10::scalarTypeToTypeMeta(model_dtype(c)));
  try {
    if (c.family == Family::Opt)
      m = std::make_shared<OptForCausalLM>(c);
    else if (c.family != Family::Gpt2)
      m = std::make_shared<LlamaForCausalLM>(c);
    else
      m = std::make_shared<Gpt2LMHeadModel>(c);
  } catch (...) {
    c10::set_default_dtype(saved);
    throw;
  }
  c10::set_default_dtype(saved);
  if (!init) return m;
  m->init_weights(0);
  if (model_dtype(c) != at::kFloat) m->to(model_dtype(c));
  return m;
}

}  // namespace qf::models
