// The distributed launch contract and c10d's Gloo backend with real processes on loopback:
// torchrun's environment parsed (SLURM fallback, bad values named), two ranks all-reduce, a rank
// that dies makes the other fail within the timeout, a rendezvous port already in use is an error.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <map>

#include "core/error.h"
#include "trainer/dist/env.h"
#include "trainer/dist/reducer.h"

using namespace qf::trainer::dist;

namespace {

GetEnv env_of(std::map<std::string, std::string> m) {
  auto held = std::make_shared<std::map<std::string, std::string>>(std::move(m));
  return [held](const char* k) -> const char* {
    auto it = held->find(k);
    return it == held->end() ? nullptr : it->second.c_str();
  };
}

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

struct Out {
  int rc;
  std::string text;
};
Out sh(const std::string& cmd) {
  Out r{-1, ""};
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  std::array<char, 4096> buf;
  while (size_t n = std::fread(buf.data(), 1, buf.size(), p)) r.text.append(buf.data(), n);
  const int st = ::pclose(p);
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

// Two ranks of `dist_probe mode`; rank 0's exit code is the command's.
std::string two_ranks(const std::string& mode, int port) {
  const std::string base = "MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " WORLD_SIZE=2 OMP_NUM_THREADS=1 ";
  return "(" + base + "RANK=1 LOCAL_RANK=1 " DIST_PROBE " " + mode + " & " + base + "RANK=0 LOCAL_RANK=0 " DIST_PROBE " " +
         mode + "; rc=$?; wait; exit $rc)";
}

}  // namespace

TEST(DistEnv, TorchrunSlurmAndSingle) {
  auto s = read_env(env_of({}));
  EXPECT_EQ(s.world_size, 1);
  EXPECT_EQ(s.source, "single");
  auto t = read_env(env_of({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"},
                            {"MASTER_ADDR", "10.0.0.5"}, {"MASTER_PORT", "29555"}}));
  EXPECT_EQ(t.rank, 3);
  EXPECT_EQ(t.world_size, 8);
  EXPECT_EQ(t.local_rank, 1);
  EXPECT_EQ(t.master_addr, "10.0.0.5");
  EXPECT_EQ(t.master_port, 29555);
  EXPECT_EQ(t.source, "torchrun");
  auto u = read_env(env_of({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"},
                            {"SLURM_NTASKS_PER_NODE", "4(x2)"}}));
  EXPECT_EQ(u.rank, 5);
  EXPECT_EQ(u.local_world_size, 4);
  EXPECT_EQ(u.source, "slurm");
}

TEST(DistEnv, InconsistentValuesAreNamed) {
  try {
    read_env(env_of({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "99999"}, {"LOCAL_RANK", "x"}}));
    FAIL();
  } catch (const qf::ConfigError& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("RANK=2 is outside [0, WORLD_SIZE=2)"), std::string::npos) << w;
    EXPECT_NE(w.find("MASTER_PORT=99999"), std::string::npos) << w;
    EXPECT_NE(w.find("LOCAL_RANK='x': expected an integer"), std::string::npos) << w;
  }
  EXPECT_THROW(read_env(env_of({{"WORLD_SIZE", "2"}})), qf::ConfigError) << "RANK missing";
}

TEST(DistGloo, TwoProcessesAllReduce) {
  auto r = sh(two_ranks("allreduce", free_port()));
  EXPECT_EQ(r.rc, 0) << r.text;
  EXPECT_NE(r.text.find("rank 0 sum 3"), std::string::npos) << r.text;
  EXPECT_NE(r.text.find("rank 1 sum 3"), std::string::npos) << r.text;
}

TEST(DistGloo, ADeadRankMakesTheOtherFailWithinTheTimeout) {
  auto r = sh(two_ranks("die", free_port()));
  EXPECT_EQ(r.rc, 1) << r.text;
  EXPECT_NE(r.text.find("rank 0: peer lost after"), std::string::npos) << r.text;
}

TEST(DistGloo, MissingPeerAndBusyPortAreErrorsWithinTheTimeout) {
  // Rank 1 never starts: rank 0 gives up at the rendezvous timeout, naming the store address.
  const int port = free_port();
  auto r = sh("MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " WORLD_SIZE=2 RANK=0 timeout 60 " DIST_PROBE);
  EXPECT_EQ(r.rc, 1) << r.text;
  EXPECT_NE(r.text.find("127.0.0.1:" + std::to_string(port)), std::string::npos) << r.text;
  EXPECT_NE(r.text.find("not every rank joined"), std::string::npos) << r.text;
  // A port some other process listens on: rank 0 cannot serve the store there.
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  a.sin_port = htons(static_cast<uint16_t>(port));
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ::listen(fd, 4);
  auto b = sh("MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " WORLD_SIZE=2 RANK=0 timeout 60 " DIST_PROBE);
  ::close(fd);
  EXPECT_EQ(b.rc, 1) << b.text;
  EXPECT_NE(b.text.find("MASTER_PORT already in use"), std::string::npos) << b.text;
}

TEST(DistZero, PartitionBalancesElementsInParameterOrder) {
  // ZeroRedundancyOptimizer's greedy rule: each parameter to the rank holding the fewest elements.
  std::vector<at::Tensor> ps{at::zeros({100}), at::zeros({10}), at::zeros({10}), at::zeros({50}), at::zeros({40})};
  auto o = qf::trainer::dist::partition(ps, 2);
  EXPECT_EQ(o, (std::vector<int>{0, 1, 1, 1, 1}));  // 100 | 10+10+50+40 = 110
  auto three = qf::trainer::dist::partition(ps, 3);
  EXPECT_EQ(three, (std::vector<int>{0, 1, 2, 1, 2}));
  EXPECT_EQ(qf::trainer::dist::partition(ps, 1), std::vector<int>(5, 0));
}
