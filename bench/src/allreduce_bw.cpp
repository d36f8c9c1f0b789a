// All-reduce bandwidth of a c10d backend as qforge creates it (trainer/dist/backend.h), reported
// the way nccl-tests' all_reduce_perf does: algbw = bytes / time, busbw = algbw * 2 (n - 1) / n
// (the bytes each link carries in a ring all-reduce; at n = 1 busbw is 0 by definition and only
// algbw, a device-local copy, is meaningful). Message sizes 4 KiB .. --max-mb in powers of 4, fp32,
// --iters timed iterations after 5 warm-up ones; rank 0 prints one JSON line per size.
// Run under a launcher: qforge launch --nproc-per-node 2 -- ... does not apply (this is not
// qforge), so set the env: bench/allreduce_bw.sh starts the ranks.
#include <ATen/ATen.h>
#include <torch/cuda.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>

#include "core/error.h"
#include "trainer/dist/backend.h"

using namespace qf;

int main(int argc, char** argv) {
  std::string backend = "gloo";
  double max_mb = 64;
  int iters = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--backend")) backend = argv[i + 1];
    else if (!std::strcmp(argv[i], "--max-mb")) max_mb = std::stod(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--iters")) iters = std::stoi(argv[i + 1]);
  }
  try {
    auto env = trainer::dist::read_env();
    const bool nccl = backend == "nccl";
    at::Device dev = nccl ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank)) : at::Device(at::kCPU);
    auto pg = trainer::dist::init_backend(env, nccl ? trainer::dist::BackendKind::Nccl : trainer::dist::BackendKind::Gloo,
                                          std::chrono::seconds(60));
    const auto sync = [&] {
      if (nccl) torch::cuda::synchronize(static_cast<int64_t>(env.local_rank));
    };
    for (int64_t bytes = 4096; bytes <= static_cast<int64_t>(max_mb * (1 << 20)); bytes *= 4) {
      std::vector<at::Tensor> t{at::ones({bytes / 4}, at::TensorOptions().dtype(at::kFloat).device(dev))};
      for (int w = 0; w < 5; ++w) pg->allreduce(t)->wait();
      sync();
      pg->barrier()->wait();
      const auto t0 = std::chrono::steady_clock::now();
      for (int k = 0; k < iters; ++k) pg->allreduce(t)->wait();
      sync();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
      const double n = static_cast<double>(env.world_size);
      const double algbw = static_cast<double>(bytes) / s / 1e9;
      if (env.rank == 0)
        std::printf("{\"backend\": \"%s\", \"world_size\": %lld, \"bytes\": %lld, \"time_us\": %.1f, \"algbw_GBps\": %.4f, \"busbw_GBps\": %.4f}\n",
                    backend.c_str(), static_cast<long long>(env.world_size), static_cast<long long>(bytes), s * 1e6, algbw,
                    algbw * 2 * (n - 1) / n);
      std::fflush(stdout);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "allreduce_bw: %s\n", e.what());
    return 1;
  }
}
