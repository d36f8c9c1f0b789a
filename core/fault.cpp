#include "core/fault.h"

#include <signal.h>

#include <cstdlib>
#include <cstring>

namespace qf {
namespace {
std::function<void(const char*)>& hook() {
  static std::function<void(const char*)> h;
  return h;
}
}  // namespace

void set_fault_hook(std::function<void(const char* point)> h) { hook() = std::move(h); }

void fault(const char* point, const std::string& path) {
  if (hook()) hook()(point);
  static const char* env = std::getenv("QFORGE_FAULT");
  if (!env) return;
  const char* colon = std::strchr(env, ':');
  const size_t n = colon ? static_cast<size_t>(colon - env) : std::strlen(env);
  if (std::strlen(point) != n || std::strncmp(env, point, n) != 0) return;
  if (colon) {
    const std::string suffix(colon + 1);
    if (path.size() < suffix.size() || path.compare(path.size() - suffix.size(), suffix.size(), suffix) != 0) return;
  }
  ::raise(SIGKILL);
}

}  // namespace qf
