#include "trainer/dist/launch.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>

#include "core/error.h"
#include "core/log.h"

namespace qf::trainer::dist {

namespace {
std::atomic<int> g_signal{0};
void on_signal(int s) { g_signal = s; }

// /proc/PID/stat's state: T (stopped by a signal) or t (stopped by a tracer).
bool is_stopped(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(f, line)) return false;
  const auto close = line.rfind(')');  // the command name may hold spaces and parentheses
  return close != std::string::npos && close + 2 < line.size() && (line[close + 2] == 'T' || line[close + 2] == 't');
}

int exit_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}
}  // namespace

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  QF_CHECK(fd >= 0, "launch: socket(): ", std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0;
  ::close(fd);
  QF_CHECK(ok, "launch: could not find a free port: ", std::strerror(errno));
  return ntohs(a.sin_port);
}

int launch(const LaunchOptions& o, const std::vector<std::string>& argv) {
  std::vector<std::string> bad;
  if (o.nproc_per_node < 1) bad.push_back(str("--nproc-per-node ", o.nproc_per_node, ": expected at least 1"));
  if (o.nnodes < 1) bad.push_back(str("--nnodes ", o.nnodes, ": expected at least 1"));
  if (o.node_rank < 0 || o.node_rank >= o.nnodes)
    bad.push_back(str("--node-rank ", o.node_rank, ": expected 0 <= node rank < --nnodes (", o.nnodes, ")"));
  if (o.master_port < 0 || o.master_port > 65535) bad.push_back(str("--master-port ", o.master_port, ": expected 1..65535"));
  if (o.nnodes > 1 && o.master_port == 0)
    bad.push_back("--master-port: give one port for every node of a multi-node launch (e.g. 29500)");
  if (argv.empty()) bad.push_back("no command: qforge launch [options] -- train CONFIG.yaml [overrides]");
  if (!bad.empty()) throw ConfigError(bad);

  const int64_t port = o.master_port > 0 ? o.master_port : free_port();
  const int64_t world = o.nnodes * o.nproc_per_node;
  log::info("launch: ", o.nproc_per_node, " processes on node ", o.node_rank, " of ", o.nnodes, " (world size ", world,
            "), rendezvous at ", o.master_addr, ":", port);
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::fflush(nullptr);

  struct sigaction sa {}, old_int{}, old_term{};
  sa.sa_handler = on_signal;
  ::sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, &old_int);
  ::sigaction(SIGTERM, &sa, &old_term);

  std::vector<pid_t> pids;
  const pid_t launcher = ::getpid();
  for (int64_t l = 0; l < o.nproc_per_node; ++l) {
    const pid_t pid = ::fork();
    QF_CHECK(pid >= 0, "launch: fork(): ", std::strerror(errno));
    if (pid == 0) {
      ::sigaction(SIGINT, &old_int, nullptr);
      ::sigaction(SIGTERM, &old_term, nullptr);
      // A launcher killed with SIGKILL cannot stop its ranks: the kernel does (SIGTERM on the
      // launcher's death; kept across exec). A launcher already gone before this line: exit now.
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (::getppid() != launcher) std::_Exit(1);
      const auto set = [](const char* k, int64_t v) { ::setenv(k, std::to_string(v).c_str(), 1); };
      set("RANK", o.node_rank * o.nproc_per_node + l);
      set("WORLD_SIZE", world);
      set("LOCAL_RANK", l);
      set("LOCAL_WORLD_SIZE", o.nproc_per_node);
      set("GROUP_RANK", o.node_rank);
      set("MASTER_PORT", port);
      ::setenv("MASTER_ADDR", o.master_addr.c_str(), 1);
      ::execv("/proc/self/exe", args.data());
      std::fprintf(stderr, "qforge launch: could not start %s: %s\n", args[0], std::strerror(errno));
      std::_Exit(127);
    }
    pids.push_back(pid);
  }

  int first_rc = 0;
  int64_t first_rank = -1, stopped_rank = -1;
  std::vector<char> alive(pids.size(), 1);
  size_t n_alive = pids.size();
  std::chrono::steady_clock::time_point kill_at{};
  bool stopping = false;
  const auto stop_all = [&](int sig) {
    for (size_t i = 0; i < pids.size(); ++i)
      if (alive[i]) ::kill(pids[i], sig);
  };
  while (n_alive > 0) {
    if (const int s = g_signal.exchange(0)) {  // the user's Ctrl-C / a scheduler's SIGTERM: pass it on
      stop_all(s);
      if (!stopping) {
        stopping = true;
        kill_at = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                         std::chrono::duration<double>(o.grace_s));
        if (first_rc == 0) first_rc = 128 + s;
      }
    }
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      for (size_t i = 0; i < pids.size(); ++i) {
        if (pids[i] != pid || !alive[i]) continue;
        alive[i] = 0;
        --n_alive;
        const int rc = exit_code(status);
        const int64_t rank = o.node_rank * o.nproc_per_node + static_cast<int64_t>(i);
        if (rc != 0 && first_rank < 0 && !stopping) {
          first_rank = rank;
          first_rc = rc;
          log::warn("launch: rank ", rank, " (pid ", pid, ") exited with code ", rc, "; stopping the other ranks");
          // A rank that is stopped (SIGSTOP, a debugger) never reaches the collective the others
          // time out in: it, not the rank that reported the timeout, is the cause.
          for (size_t j = 0; j < pids.size(); ++j)
            if (alive[j] && is_stopped(pids[j])) {
              stopped_rank = o.node_rank * o.nproc_per_node + static_cast<int64_t>(j);
              log::warn("launch: rank ", stopped_rank, " (pid ", pids[j], ") is stopped (SIGSTOP or a debugger): the "
                        "other ranks timed out waiting for it in a collective");
              break;
            }
          stop_all(SIGTERM);
          stop_all(SIGCONT);  // a stopped rank handles SIGTERM only once it runs again
          stopping = true;
          kill_at = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                           std::chrono::duration<double>(o.grace_s));
        }
      }
      continue;
    }
    if (stopping && std::chrono::steady_clock::now() > kill_at) stop_all(SIGKILL);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ::sigaction(SIGINT, &old_int, nullptr);
  ::sigaction(SIGTERM, &old_term, nullptr);
  if (stopped_rank >= 0)
    std::fprintf(stderr,
                 "qforge launch: failed: rank %lld was stopped (SIGSTOP or a debugger), so rank %lld timed out "
                 "waiting for it (dist.timeout_s) and exited with code %d\n",
                 static_cast<long long>(stopped_rank), static_cast<long long>(first_rank), first_rc);
  else if (first_rank >= 0)
    std::fprintf(stderr, "qforge launch: failed: rank %lld exited with code %d (its own message is above)\n",
                 static_cast<long long>(first_rank), first_rc);
  return first_rc;
}

}  // namespace qf::trainer::dist
