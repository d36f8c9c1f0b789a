// trainer::DataParallel without a Trainer: two ranks as two threads of this process, each with its
// own Gloo process group over a loopback TCPStore, on a two-layer MLP. Rank 0's weights broadcast;
// a config hash that differs from rank 0's refused; summed gradients (bucketed, with an accumulation
// micro-step that does not sync) equal one process's over the global batch; ZeRO-2 (gradients
// reduced to their owners, sharded clipping, parameter all-gather) trains exactly like one process,
// and the optimizer state rank 0 gathers equals the unsharded AdamW's; one process is the identity.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>

#include <functional>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "trainer/checkpoint.h"
#include "trainer/data_parallel.h"

using namespace qf::trainer;

namespace {

int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t n = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &n);
  ::close(fd);
  return ntohs(a.sin_port);
}

// The ranks are threads sharing the default generator: initialisation holds a lock.
std::mutex init_mutex;

struct MlpImpl : torch::nn::Module {
  explicit MlpImpl(uint64_t seed) {
    std::lock_guard<std::mutex> lock(init_mutex);
    at::manual_seed(seed);
    a = register_module("a", torch::nn::Linear(4, 8));
    b = register_module("b", torch::nn::Linear(8, 3));
  }
  at::Tensor forward(const at::Tensor& x) { return b->forward(at::tanh(a->forward(x))); }
  torch::nn::Linear a{nullptr}, b{nullptr};
};

std::vector<at::Tensor> trainable(const torch::nn::Module& m) {
  std::vector<at::Tensor> v;
  for (auto& p : m.parameters())
    if (p.requires_grad()) v.push_back(p);
  return v;
}

// Runs f(rank, dp) on ranks 0 and 1 of a Gloo world of two (threads); returns each rank's error
// message ("" when it finished). A rank stuck in a collective fails after the 30 s timeout.
std::vector<std::string> on_two_ranks(const DistConfig& cfg, const std::function<void(int, DataParallel&)>& f) {
  const int port = free_port();
  std::vector<std::string> errors(2);
  std::vector<std::thread> ranks;
  for (int r = 0; r < 2; ++r)
    ranks.emplace_back([&, r] {
      try {
        dist::Env env;
        env.rank = env.local_rank = r;
        env.world_size = env.local_world_size = 2;
        env.master_port = port;
        env.source = "torchrun";
        auto pg = dist::init_backend(env, dist::BackendKind::Gloo, std::chrono::seconds(30));
        DataParallel dp(pg, env, at::kCPU, cfg);
        f(r, dp);
      } catch (const std::exception& e) {
        errors[r] = e.what();
        if (errors[r].empty()) errors[r] = "(exception without a message)";
      }
    });
  for (auto& t : ranks) t.join();
  return errors;
}

// The global batch: 8 rows; rank r takes rows [4r, 4r + 4). Loss = squared error summed over the
// rows, divided by the global row count, so the ranks' gradients sum to the global batch's.
struct Data {
  at::Tensor x = at::linspace(-2, 2, 32).reshape({8, 4}).sin(), y = at::linspace(-1, 1, 24).reshape({8, 3});
  at::Tensor loss(MlpImpl& m, int64_t lo, int64_t n) const {
    return (m.forward(x.slice(0, lo, lo + n)) - y.slice(0, lo, lo + n)).pow(2).sum() / 8.0;
  }
};

void expect_close(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  if (!want.is_floating_point()) {
    EXPECT_TRUE(at::equal(got, want)) << what << ": " << got << " vs " << want;
    return;
  }
  EXPECT_TRUE(at::allclose(got, want, 1e-5, 1e-7)) << what << ": max |diff| " << (got - want).abs().max().item<double>();
}

}  // namespace

TEST(DataParallel, BroadcastGivesEveryRankRank0sWeights) {
  std::vector<std::vector<at::Tensor>> after(2);
  auto errors = on_two_ranks({}, [&](int r, DataParallel& dp) {
    MlpImpl m(100 + r);  // different initial weights on each rank
    dp.broadcast_model(m.parameters(), "00c0ffee", 0);
    for (auto& p : m.parameters()) after[r].push_back(p.detach().clone());
  });
  ASSERT_EQ(errors, (std::vector<std::string>{"", ""}));
  MlpImpl rank0(100), rank1(101);
  ASSERT_FALSE(at::equal(rank0.a->weight, rank1.a->weight)) << "the ranks must start apart for the test to mean anything";
  ASSERT_EQ(after[0].size(), 4u);
  const auto want = rank0.parameters();
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_TRUE(at::equal(after[0][i], want[i])) << "rank 0 keeps its weights, parameter " << i;
    EXPECT_TRUE(at::equal(after[1][i], want[i])) << "rank 1 takes rank 0's, parameter " << i;
  }
}

TEST(DataParallel, AConfigThatDiffersFromRank0sIsRefused) {
  auto errors = on_two_ranks({}, [](int r, DataParallel& dp) { dp.broadcast_model({}, r == 0 ? "00c0ffee" : "00beef", 0); });
  EXPECT_EQ(errors[0], "");
  EXPECT_NE(errors[1].find("rank 1's resolved config (hash 00beef) differs from rank 0's"), std::string::npos) << errors[1];
}

TEST(DataParallel, SummedGradientsEqualOneProcessOverTheGlobalBatch) {
  // Reference: one process, the whole batch in two micro-batches of 4 rows.
  const Data data;
  MlpImpl ref(7);
  for (int64_t lo : {0, 4}) data.loss(ref, lo, 4).backward();
  DistConfig cfg;
  cfg.bucket_mb = 1e-4;  // ~100 bytes: several buckets for 4 parameters
  cfg.first_bucket_mb = 1e-5;
  std::vector<std::vector<at::Tensor>> grads(2);
  std::vector<std::vector<double>> sums(2);
  std::vector<size_t> buckets(2);
  auto errors = on_two_ranks(cfg, [&](int r, DataParallel& dp) {
    MlpImpl m(7);
    dp.broadcast_model(m.parameters(), "1", 0);
    dp.attach(trainable(m));
    // Each rank: 4 rows as two accumulation micro-steps of 2; only the last one communicates.
    for (int a = 0; a < 2; ++a) {
      dp.begin_backward(a == 1);
      data.loss(m, 4 * r + 2 * a, 2).backward();
    }
    dp.finish_backward(1);
    for (auto& p : m.parameters()) grads[r].push_back(p.grad().clone());
    sums[r] = dp.allreduce_sums({r + 1.0, 10.0}, "test sums", 1);
    buckets[r] = dp.summary()["buckets"].get<size_t>();
  });
  ASSERT_EQ(errors, (std::vector<std::string>{"", ""}));
  EXPECT_GT(buckets[0], 1u) << "tiny buckets: the gradients travel in several";
  const auto want = ref.parameters();
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(sums[r], (std::vector<double>{3.0, 20.0})) << "rank " << r;
    ASSERT_EQ(grads[r].size(), want.size());
    for (size_t i = 0; i < want.size(); ++i)
      expect_close(grads[r][i], want[i].grad(), "rank " + std::to_string(r) + " gradient " + std::to_string(i));
  }
}

TEST(DataParallel, ObserverStatisticsAreCombinedOverTheRanks) {
  std::vector<std::vector<double>> got(2);
  auto errors = on_two_ranks({}, [&](int r, DataParallel& dp) {
    // exact (minmax): min of the mins, max of the maxes; otherwise the means.
    at::Tensor mn = at::full({1}, r == 0 ? -1.0 : -3.0), mx = at::full({1}, r == 0 ? 5.0 : 2.0);
    dp.sync_observer(mn, mx, true, 1);
    at::Tensor mean_mn = at::full({1}, r == 0 ? -1.0 : -3.0), mean_mx = at::full({1}, r == 0 ? 5.0 : 2.0);
    dp.sync_observer(mean_mn, mean_mx, false, 1);
    got[r] = {mn.item<double>(), mx.item<double>(), mean_mn.item<double>(), mean_mx.item<double>()};
  });
  ASSERT_EQ(errors, (std::vector<std::string>{"", ""}));
  for (int r = 0; r < 2; ++r) EXPECT_EQ(got[r], (std::vector<double>{-3.0, 5.0, -2.0, 3.5})) << "rank " << r;
}

TEST(DataParallel, Zero2TrainsLikeOneProcessAndGathersTheUnshardedOptimizerState) {
  const Data data;
  const double clip = 0.05;  // below the gradients' norm: clipping scales every step
  const auto adamw = torch::optim::AdamWOptions(0.02).weight_decay(0.01);
  // Reference: one process, whole batch, torch's clipping, one AdamW over every parameter.
  MlpImpl ref(11);
  torch::optim::AdamW ref_opt(ref.parameters(), adamw);
  double ref_norm = 0;
  for (int step = 0; step < 3; ++step) {
    ref_opt.zero_grad();
    data.loss(ref, 0, 8).backward();
    ref_norm = torch::nn::utils::clip_grad_norm_(ref.parameters(), clip);
    ref_opt.step();
  }
  const auto ref_state = optimizer_state(ref, ref_opt);
  ASSERT_EQ(ref_state.size(), 12u);  // exp_avg, exp_avg_sq, step for each of the 4 parameters
  ASSERT_GT(ref_norm, clip);

  DistConfig cfg;
  cfg.zero = 2;
  std::vector<std::vector<at::Tensor>> params(2);
  std::vector<qf::models::NamedTensors> gathered(2), local(2);
  std::vector<int64_t> grad_bytes(2), owned(2);
  std::vector<double> norm(2);
  auto errors = on_two_ranks(cfg, [&](int r, DataParallel& dp) {
    MlpImpl m(11);
    dp.broadcast_model(m.parameters(), "1", 0);
    dp.attach(trainable(m));
    owned[r] = static_cast<int64_t>(dp.owned().size());
    torch::optim::AdamW opt(dp.owned(), adamw);
    for (int step = 0; step < 3; ++step) {
      m.zero_grad();
      dp.begin_backward(true);
      data.loss(m, 4 * r, 4).backward();
      dp.finish_backward(step + 1);
      norm[r] = dp.clip_grad_norm(clip, step + 1);
      opt.step();
      dp.sync_params(step);
    }
    for (auto& p : m.parameters()) params[r].push_back(p.detach().clone());
    grad_bytes[r] = dp.grad_bytes();
    local[r] = optimizer_state(m, opt);
    gathered[r] = dp.gather_optimizer_state(m, opt, 3);
  });
  ASSERT_EQ(errors, (std::vector<std::string>{"", ""}));
  // The partition (a.weight 32, a.bias 8, b.weight 24, b.bias 3 elements): {a.weight, b.bias} on
  // rank 0, {a.bias, b.weight} on rank 1; each AdamW holds its own two, each rank two gradients.
  EXPECT_EQ(owned, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(local[0].size(), 6u);
  EXPECT_EQ(local[1].size(), 6u);
  EXPECT_EQ(grad_bytes[0], (32 + 3) * 4);
  EXPECT_EQ(grad_bytes[1], (8 + 24) * 4);
  const auto want = ref.parameters();
  for (int r = 0; r < 2; ++r) {
    EXPECT_NEAR(norm[r], ref_norm, 1e-5 * ref_norm) << "rank " << r << ": the norm over every rank's shard";
    ASSERT_EQ(params[r].size(), want.size());
    for (size_t i = 0; i < want.size(); ++i)
      expect_close(params[r][i], want[i].detach(), "rank " + std::to_string(r) + " parameter " + std::to_string(i));
  }
  // Rank 0 holds the whole state, named and ordered as one process's; the other rank gets nothing.
  EXPECT_TRUE(gathered[1].empty());
  ASSERT_EQ(gathered[0].size(), ref_state.size());
  for (size_t i = 0; i < ref_state.size(); ++i) {
    EXPECT_EQ(gathered[0][i].first, ref_state[i].first);
    expect_close(gathered[0][i].second, ref_state[i].second, gathered[0][i].first);
  }
}

TEST(DataParallel, OneProcessIsTheIdentity) {
  DistConfig cfg;
  cfg.zero = 2;  // nothing to shard without a group
  DataParallel dp(nullptr, dist::Env{}, at::kCPU, cfg);
  EXPECT_FALSE(dp.active());
  MlpImpl m(3);
  const auto before = m.a->weight.detach().clone();
  dp.broadcast_model(m.parameters(), "1", 0);
  dp.attach(trainable(m));
  EXPECT_EQ(dp.zero(), 0);
  EXPECT_EQ(dp.owned().size(), 4u);
  torch::optim::AdamW opt(dp.owned(), torch::optim::AdamWOptions(0.1));
  Data().loss(m, 0, 8).backward();
  dp.finish_backward(1);
  opt.step();
  dp.sync_params(0);
  EXPECT_FALSE(at::equal(before, m.a->weight));
  EXPECT_EQ(dp.allreduce_sums({1.5, 2.0}, "sums", 1), (std::vector<double>{1.5, 2.0}));
  EXPECT_EQ(dp.gather_optimizer_state(m, opt, 1).size(), optimizer_state(m, opt).size());
  EXPECT_TRUE(dp.summary().empty());
  dist::Env two;
  two.world_size = 2;
  EXPECT_THROW(DataParallel(nullptr, two, at::kCPU, cfg), qf::Error) << "a world of two needs a group";
}
