// libFuzzer target for YAML recipe loading (core/config.*), built with clang
// -fsanitize=fuzzer,address,undefined by tests/CMakeLists.txt (no libtorch: core/config needs only
// yaml-cpp) and run for a bounded time by ctest (test fuzz_yaml_recipe); `make fuzz` runs it for
// 10^6 inputs. An input is recipe text, then optionally a NUL byte and override lines (`a.b=value`,
// one per line, as `--set` gives them). The recipe is loaded as <tmp>/recipe.yaml next to two real
// files a `base:` may name (base.yaml, a small recipe, and loop.yaml, a `base:` cycle); the overrides
// are applied, then every key of the result is read with every Reader accessor (typed conversions
// on values of every shape) and finish() runs on each mapping. Loading must either throw
// qf::ConfigError / qf::InputError or give a tree whose walk throws nothing but those; anything
// else (another exception, a sanitizer report) is a crash. Inputs naming /dev, /proc or /sys are
// skipped: a `base:` on a device or /proc file reads forever, which is the user's own doing.
// Seeds: tests/fuzz/seeds_yaml/.
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/error.h"

namespace {

std::string g_dir;

enum class Color { Red, Green };

void walk(qf::cfg::Reader& r, const YAML::Node& node, int depth) {
  if (depth > 32 || !node.IsMap()) {
    r.finish();
    return;
  }
  std::vector<std::string> keys;
  for (auto it = node.begin(); it != node.end(); ++it)
    if (it->first.IsScalar()) keys.push_back(it->first.Scalar());
  for (const auto& k : keys) {
    const YAML::Node v = node[k];
    (void)r.has(k);
    (void)r.i64(k, 1, -1000000, 1000000);
    (void)r.i64(k, 0, INT64_MIN, INT64_MAX);
    (void)r.f64(k, 0.5, 0.0, 1.0);
    (void)r.f64(k, 0.0, -1e300, 1e300);
    (void)r.boolean(k, false);
    (void)r.str(k, "d");
    (void)r.strings(k, {"a"});
    (void)r.f64s(k, {1.0});
    (void)r.path(k, "", false);
    (void)r.path(k, "", true);
    (void)r.choice<Color>(k, Color::Red, {{"red", Color::Red}, {"green", Color::Green}});
    qf::cfg::Reader c = r.child(k);
    walk(c, v && v.IsMap() ? v : YAML::Node(YAML::NodeType::Map), depth + 1);
    auto items = r.list(k);
    for (size_t i = 0; i < items.size() && i < 16; ++i) walk(items[i], v[i], depth + 1);
  }
  (void)r.i64("no_such_key", 3, 0, 10);
  r.fail("no_such_key", "a semantic check");
  r.finish();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  char tmpl[] = "/tmp/qforge-fuzz-yaml-XXXXXX";
  const char* d = mkdtemp(tmpl);
  if (!d) std::abort();
  g_dir = d;
  std::atexit([] {
    std::error_code ec;
    std::filesystem::remove_all(g_dir, ec);
  });
  std::ofstream(g_dir + "/base.yaml") << "model:\n  dim: 64\n  n_layers: 2\ntrainer:\n  lr: 3.0e-4\n  steps: 10\n"
                                      << "data:\n  sources:\n    - path: a.txt\n      weight: 1\n";
  std::ofstream(g_dir + "/loop.yaml") << "base: loop.yaml\nmodel: {dim: 8}\n";
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string all(reinterpret_cast<const char*>(data), size);
  for (const char* s : {"/dev", "/proc", "/sys"})
    if (all.find(s) != std::string::npos) return 0;
  const size_t nul = all.find('\0');
  const std::string text = all.substr(0, nul);
  std::vector<std::string> overrides;
  if (nul != std::string::npos) {
    const std::string rest = all.substr(nul + 1);
    size_t at = 0;
    while (at <= rest.size() && overrides.size() < 8) {
      size_t nl = rest.find('\n', at);
      if (nl == std::string::npos) nl = rest.size();
      overrides.push_back(rest.substr(at, nl - at));
      at = nl + 1;
    }
  }
  try {
    YAML::Node root = qf::cfg::load_yaml_text(text, g_dir + "/recipe.yaml");
    qf::cfg::Problems p;
    for (const auto& o : overrides) qf::cfg::apply_override(root, o, &p);
    p.throw_if_any();
    qf::cfg::Problems walk_problems;
    YAML::Node resolved(YAML::NodeType::Map);
    qf::cfg::Reader r(root, "", &walk_problems, resolved);
    walk(r, root, 0);
    (void)qf::cfg::dump(resolved);
    (void)qf::cfg::dump(root);
    walk_problems.throw_if_any();
  } catch (const qf::ConfigError&) {
  } catch (const qf::InputError&) {
  }
  return 0;
}
