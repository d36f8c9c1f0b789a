// A process of a distributed test (tests/trainer/dist_test.cpp starts several, torchrun-style env):
//   dist_probe allreduce   every rank all-reduces [rank+1]*4 and prints "rank R sum S"
//   dist_probe die         as allreduce, then rank 1 exits; the others try a second all-reduce and
//                          must fail (exit 1) within the timeout, saying which peer went away
// Exit codes: 0 ok, 1 error (message on stderr), 2 config error.
#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <string>

#include "core/error.h"
#include "trainer/dist/backend.h"

using namespace qf;

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "allreduce";
  try {
    auto env = trainer::dist::read_env();
    auto pg = trainer::dist::init_backend(env, trainer::dist::BackendKind::Gloo, std::chrono::seconds(10));
    std::vector<at::Tensor> t{at::full({4}, static_cast<double>(env.rank + 1))};
    pg->allreduce(t)->wait();
    std::printf("rank %lld sum %g\n", (long long)env.rank, t[0][0].item<double>());
    std::fflush(stdout);
    if (mode == "die") {
      if (env.rank == 1) std::_Exit(0);
      const auto t0 = std::chrono::steady_clock::now();
      try {
        std::vector<at::Tensor> u{at::ones({4})};
        pg->allreduce(u)->wait();
      } catch (const std::exception& e) {
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::fprintf(stderr, "rank %lld: peer lost after %.2f s: %s\n", (long long)env.rank, s, first_line(e.what()).c_str());
        return 1;
      }
      std::printf("rank %lld: second all-reduce succeeded without rank 1\n", (long long)env.rank);
    }
    return 0;
  } catch (const ConfigError& e) {
    std::fprintf(stderr, "config error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
