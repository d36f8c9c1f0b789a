// What a frozen LoRA base costs per forward on the CPU: the time to materialize one [out, in] weight
// from each storage (bf16, NF4, llama.cpp blocks, a GPTQ-layout packed int4 group-128 weight through
// the CPU loop and through the ATen path a GPU runs; for the blocks also exact_merge's fake quant of
// the merged weight) against the fp32 matmul of `tokens` rows with it.
// Each figure is the minimum over `reps` runs (a loaded machine inflates the rest), in ms and ns per
// weight. Usage: served_base_dequant [out in tokens reps threads]   (default 2048 2048 256 7 2)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>

#include "models/hf_quantized.h"
#include "models/linear.h"
#include "models/packed_linear.h"
#include "quant/block_linear.h"
#include "quant/ggml_types.h"
#include "quant/nf4.h"

using namespace qf;

namespace {

double min_ms(int reps, const std::function<void()>& f) {
  f();  // warm caches and allocator
  double best = 1e300;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t out = argc > 1 ? std::atoll(argv[1]) : 2048, in = argc > 2 ? std::atoll(argv[2]) : 2048;
  const int64_t tokens = argc > 3 ? std::atoll(argv[3]) : 256;
  const int reps = argc > 4 ? std::atoi(argv[4]) : 7;
  at::set_num_threads(argc > 5 ? std::atoi(argv[5]) : 2);
  at::manual_seed(0);
  const auto w = at::randn({out, in}) * 0.02, x = at::randn({tokens, in});
  const double mm = min_ms(reps, [&] { at::linear(x, w); });
  std::printf("weight [%lld, %lld], %lld tokens, %d threads, min of %d runs\n", static_cast<long long>(out),
              static_cast<long long>(in), static_cast<long long>(tokens), at::get_num_threads(), reps);
  std::printf("%-28s %9s %12s %14s %16s\n", "storage", "bits/w", "dequant ms", "ns per weight", "x fp32 matmul");
  std::printf("%-28s %9.3f %12.3f %14s %16s\n", "fp32 matmul (reference)", 32.0, mm, "-", "1.00");
  auto row = [&](const std::string& name, double bits, const std::function<void()>& f) {
    const double ms = min_ms(reps, f);
    std::printf("%-28s %9.3f %12.3f %14.3f %16.2f\n", name.c_str(), bits, ms, ms * 1e6 / static_cast<double>(out * in),
                ms / mm);
  };
  auto bits_of = [&](torch::nn::Module& m) {
    int64_t b = 0;
    for (auto& t : m.buffers()) b += t.numel() * t.element_size();
    return 8.0 * static_cast<double>(b) / static_cast<double>(out * in);
  };
  {
    models::HalfLinear h(w, {}, at::kBFloat16);
    row("bf16", bits_of(h), [&] { h.materialize(at::kFloat); });
  }
  {
    quant::Nf4Linear n(w, {}, 64, true);
    row("nf4 (double quant)", bits_of(n), [&] { n.materialize(at::kFloat); });
  }
  for (const char* t : {"q8_0", "q4_0", "q4_k", "q6_k"}) {
    quant::BlockLinear b(w, {}, quant::ggml::traits_by_name(t)->rule);
    row(std::string("llama.cpp ") + t, bits_of(b), [&] { b.materialize(at::kFloat); });
    // exact_merge's forward also fake-quantizes W + s*BA (the type's quantize + dequantize)
    const auto delta = at::zeros({out, in});
    row(std::string("  exact merge: + fq ") + t, bits_of(b), [&] { b.merged_fake_quant(delta); });
  }
  {  // GPTQ int4 group 128, symmetric codes around 8, fp16 scales, contiguous groups
    const int64_t groups = in / 128;
    models::HfQuant q;
    q.method = models::HfQuantMethod::Gptq;
    q.bits = 4;
    q.group_size = 128;
    q.zeros_v2 = true;
    std::map<std::string, at::Tensor> parts{
        {"qweight", models::packed::pack_cols(at::randint(0, 16, {out, in}, at::kLong), 4).t().contiguous()},
        {"qzeros", models::packed::pack_cols(at::full({groups, out}, 8, at::kLong), 4)},
        {"scales", (at::rand({groups, out}) * 0.01).to(at::kHalf)}};
    auto p = models::PackedIntLinear::from_checkpoint(q, "bench", out, in, parts, {});
    row("packed gptq int4 g128", bits_of(*p), [&] { p->materialize(at::kFloat); });
    row("  same, ATen path", bits_of(*p), [&] { models::dequantize_packed_int_aten(p->state(), out, in); });
  }
  return 0;
}
