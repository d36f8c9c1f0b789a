// YAML config reading with full-path validation. Invariant: a Reader only reads; every problem
// (unknown key, wrong type, out of range, inconsistent combination, missing file) is recorded
// with its full key path and the caller throws one ConfigError listing all of them. Each value
// read is also recorded (defaults filled in) into a "resolved" tree: that tree is what
// `--print-config` prints and what a run directory snapshots, so a key is declared exactly once.
#pragma once
#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"

namespace qf::cfg {

// One spelling per value of an enum a recipe names: Reader::choice parses with the table and
// name_of writes with it, so a config that qforge writes reads back unchanged.
template <class E>
using Names = std::vector<std::pair<std::string, E>>;
template <class E>
const std::string& name_of(const Names<E>& names, E v) {
  for (const auto& [n, x] : names)
    if (x == v) return n;
  throw Error("cfg::name_of: an enum value has no name in its table");
}

struct Problems {
  std::vector<std::string> items;
  void add(const std::string& path, const std::string& msg) { items.push_back(path + ": " + msg); }
  bool empty() const { return items.empty(); }
  // Throws ConfigError listing all problems if there are any.
  void throw_if_any() const;
};

class Reader {
 public:
  Reader(YAML::Node node, std::string path, Problems* problems, YAML::Node resolved);

  int64_t i64(const std::string& key, int64_t def, int64_t lo, int64_t hi);
  double f64(const std::string& key, double def, double lo, double hi);
  bool boolean(const std::string& key, bool def);
  std::string str(const std::string& key, const std::string& def);
  std::vector<std::string> strings(const std::string& key, const std::vector<std::string>& def);
  std::vector<double> f64s(const std::string& key, const std::vector<double>& def);
  // A path that must exist (file or directory) unless `must_exist` is false; "" = not set.
  std::string path(const std::string& key, const std::string& def, bool must_exist);

  // One of `allowed` (name, value); the error lists the allowed names.
  template <class E>
  E choice(const std::string& key, E def, const std::vector<std::pair<std::string, E>>& allowed);

  // A nested map (missing => empty map, so defaults apply). Call finish() on it when done.
  Reader child(const std::string& key);
  // A list of maps, each with its own Reader (paths like data.sources[1].path).
  std::vector<Reader> list(const std::string& key);

  bool has(const std::string& key) const;
  // Records a problem for `key` (inconsistent combinations, semantic checks).
  void fail(const std::string& key, const std::string& msg);
  std::string key_path(const std::string& key) const;
  // Reports every key present in the YAML map that no accessor read.
  void finish();
  Problems* problems() const { return problems_; }
  const YAML::Node& resolved() const { return resolved_; }

 private:
  YAML::Node raw(const std::string& key);
  YAML::Node node_;
  std::string path_;
  Problems* problems_;
  YAML::Node resolved_;
  std::set<std::string> read_;
};

template <class E>
E Reader::choice(const std::string& key, E def, const std::vector<std::pair<std::string, E>>& allowed) {
  std::string names;
  std::string def_name;
  for (auto& [n, v] : allowed) {
    names += (names.empty() ? "" : "|") + n;
    if (v == def) def_name = n;
  }
  std::string got = def_name;
  YAML::Node n = raw(key);
  if (n && !n.IsNull()) {
    if (!n.IsScalar()) {
      fail(key, "expected one of " + names);
      return def;
    }
    got = n.Scalar();
  }
  for (auto& [name, v] : allowed) {
    if (name == got) {
      resolved_[key] = name;
      return v;
    }
  }
  fail(key, "'" + got + "' is not allowed; expected one of " + names);
  return def;
}

// Loads a YAML file (ConfigError with file:line:col on malformed YAML), then applies overrides
// of the form `a.b.c=value` (value parsed as YAML, so numbers and lists keep their types).
YAML::Node load_yaml(const std::string& file, const std::vector<std::string>& overrides);
// The recipe file `name` holding `text` (what load_yaml does after reading the file, without
// overrides): ConfigError on malformed YAML, repeated or complex keys; `base:` is resolved
// relative to name's directory.
YAML::Node load_yaml_text(const std::string& text, const std::string& name);
void apply_override(YAML::Node& root, const std::string& assignment, Problems* problems);
// Writes `node` as YAML text; used for --print-config and run-directory snapshots.
std::string dump(const YAML::Node& node);

}  // namespace qf::cfg
