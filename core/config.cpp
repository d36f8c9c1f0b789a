#include "core/config.h"

#include <map>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

namespace qf {

static std::string join_problems(const std::vector<std::string>& p) {
  std::string s = "invalid configuration (" + std::to_string(p.size()) + " problem" + (p.size() == 1 ? "" : "s") + "):";
  for (auto& x : p) s += "\n  - " + x;
  return s;
}

ConfigError::ConfigError(std::vector<std::string> p) : Error(join_problems(p)), problems(std::move(p)) {}

namespace cfg {

void Problems::throw_if_any() const {
  if (!items.empty()) throw ConfigError(items);
}

Reader::Reader(YAML::Node node, std::string path, Problems* problems, YAML::Node resolved)
    : node_(std::move(node)), path_(std::move(path)), problems_(problems), resolved_(std::move(resolved)) {
  if (node_ && !node_.IsNull() && !node_.IsMap()) {
    problems_->add(path_.empty() ? "<root>" : path_, "expected a mapping of keys to values");
    node_ = YAML::Node(YAML::NodeType::Map);
  }
}

std::string Reader::key_path(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }

void Reader::fail(const std::string& key, const std::string& msg) { problems_->add(key_path(key), msg); }

bool Reader::has(const std::string& key) const {
  return node_ && node_.IsMap() && node_[key] && !node_[key].IsNull();
}

YAML::Node Reader::raw(const std::string& key) {
  read_.insert(key);
  if (!node_ || !node_.IsMap()) return YAML::Node();
  YAML::Node n = node_[key];
  return n;
}

static std::string scalar_text(const YAML::Node& n) {
  if (n.IsScalar()) return "'" + n.Scalar() + "'";
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a mapping";
  return "nothing";
}

static std::string fmt_num(double v) {
  if (v == std::numeric_limits<double>::infinity()) return "inf";
  if (v == -std::numeric_limits<double>::infinity()) return "-inf";
  std::ostringstream o;
  o << v;
  return o.str();
}

int64_t Reader::i64(const std::string& key, int64_t def, int64_t lo, int64_t hi) {
  YAML::Node n = raw(key);
  int64_t v = def;
  std::string range = "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  if (n && !n.IsNull()) {
    bool ok = n.IsScalar();
    if (ok) {
      try {
        v = n.as<int64_t>();
      } catch (const YAML::Exception&) {
        ok = false;
      }
    }
    if (!ok) {
      fail(key, "expected an integer in " + range + ", got " + scalar_text(n));
      return def;
    }
  }
  if (v < lo || v > hi) {
    fail(key, "value " + std::to_string(v) + " is out of range; expected an integer in " + range);
    return def;
  }
  resolved_[key] = v;
  return v;
}

double Reader::f64(const std::string& key, double def, double lo, double hi) {
  YAML::Node n = raw(key);
  double v = def;
  std::string range = "[" + fmt_num(lo) + ", " + fmt_num(hi) + "]";
  if (n && !n.IsNull()) {
    bool ok = n.IsScalar();
    if (ok) {
      try {
        v = n.as<double>();
      } catch (const YAML::Exception&) {
        ok = false;
      }
    }
    if (!ok || std::isnan(v)) {
      fail(key, "expected a number in " + range + ", got " + scalar_text(n));
      return def;
    }
  }
  if (v < lo || v > hi) {
    fail(key, "value " + fmt_num(v) + " is out of range; expected a number in " + range);
    return def;
  }
  resolved_[key] = v;
  return v;
}

bool Reader::boolean(const std::string& key, bool def) {
  YAML::Node n = raw(key);
  bool v = def;
  if (n && !n.IsNull()) {
    bool ok = n.IsScalar();
    if (ok) {
      try {
        v = n.as<bool>();
      } catch (const YAML::Exception&) {
        ok = false;
      }
    }
    if (!ok) {
      fail(key, "expected true or false, got " + scalar_text(n));
      return def;
    }
  }
  resolved_[key] = v;
  return v;
}

std::string Reader::str(const std::string& key, const std::string& def) {
  YAML::Node n = raw(key);
  std::string v = def;
  if (n && !n.IsNull()) {
    if (!n.IsScalar()) {
      fail(key, "expected a string, got " + scalar_text(n));
      return def;
    }
    v = n.Scalar();
  }
  resolved_[key] = v;
  return v;
}

std::vector<std::string> Reader::strings(const std::string& key, const std::vector<std::string>& def) {
  YAML::Node n = raw(key);
  std::vector<std::string> v = def;
  if (n && !n.IsNull()) {
    v.clear();
    if (n.IsScalar()) {
      v.push_back(n.Scalar());
    } else if (n.IsSequence()) {
      for (size_t i = 0; i < n.size(); ++i) {
        if (!n[i].IsScalar()) {
          fail(key + "[" + std::to_string(i) + "]", "expected a string, got " + scalar_text(n[i]));
          return def;
        }
        v.push_back(n[i].Scalar());
      }
    } else {
      fail(key, "expected a string or a list of strings, got " + scalar_text(n));
      return def;
    }
  }
  YAML::Node out(YAML::NodeType::Sequence);
  for (auto& s : v) out.push_back(s);
  resolved_[key] = out;
  return v;
}

std::vector<double> Reader::f64s(const std::string& key, const std::vector<double>& def) {
  YAML::Node n = raw(key);
  std::vector<double> v = def;
  if (n && !n.IsNull()) {
    v.clear();
    bool ok = n.IsSequence();
    if (ok) {
      try {
        for (size_t i = 0; i < n.size(); ++i) v.push_back(n[i].as<double>());
      } catch (const YAML::Exception&) {
        ok = false;
      }
    }
    if (!ok) {
      fail(key, "expected a list of numbers, got " + scalar_text(n));
      return def;
    }
  }
  YAML::Node out(YAML::NodeType::Sequence);
  out.SetStyle(YAML::EmitterStyle::Flow);
  for (double d : v) out.push_back(d);
  resolved_[key] = out;
  return v;
}

std::string Reader::path(const std::string& key, const std::string& def, bool must_exist) {
  std::string p = str(key, def);
  if (must_exist && !p.empty()) {
    std::error_code ec;  // a name the OS refuses (too long, ...) is a problem, not a filesystem_error
    if (!std::filesystem::exists(p, ec))
      fail(key, "path '" + p + "' does not exist" + (ec && ec != std::errc::no_such_file_or_directory ? " (" + ec.message() + ")" : ""));
  }
  return p;
}

Reader Reader::child(const std::string& key) {
  YAML::Node n = raw(key);
  if (n && !n.IsNull() && !n.IsMap()) {
    fail(key, "expected a mapping, got " + scalar_text(n));
    n = YAML::Node(YAML::NodeType::Map);
  }
  YAML::Node res = resolved_[key];
  if (!res.IsMap()) {
    res = YAML::Node(YAML::NodeType::Map);
    resolved_[key] = res;
  }
  return Reader(n ? n : YAML::Node(YAML::NodeType::Map), key_path(key), problems_, resolved_[key]);
}

std::vector<Reader> Reader::list(const std::string& key) {
  YAML::Node n = raw(key);
  std::vector<Reader> out;
  if (!n || n.IsNull()) return out;
  if (!n.IsSequence()) {
    fail(key, "expected a list of mappings, got " + scalar_text(n));
    return out;
  }
  YAML::Node res(YAML::NodeType::Sequence);
  for (size_t i = 0; i < n.size(); ++i) res.push_back(YAML::Node(YAML::NodeType::Map));
  resolved_[key] = res;
  for (size_t i = 0; i < n.size(); ++i)
    out.emplace_back(n[i], key_path(key) + "[" + std::to_string(i) + "]", problems_, res[i]);
  return out;
}

void Reader::finish() {
  if (!node_ || !node_.IsMap()) return;
  std::string known;
  for (auto& k : read_) known += (known.empty() ? "" : ", ") + k;
  for (auto it = node_.begin(); it != node_.end(); ++it) {
    if (!it->first.IsScalar()) {  // load_yaml refuses these; a tree built by hand may still hold one
      problems_->add(path_.empty() ? "<top level>" : path_, "a mapping key is not a plain name");
      continue;
    }
    const std::string k = it->first.Scalar();
    if (!read_.count(k)) problems_->add(key_path(k), "unknown key; known keys here: " + known);
  }
}

// Recursively overlays `over` onto a copy of `base` (maps merge key by key; anything else replaces).
static YAML::Node merge(const YAML::Node& base, const YAML::Node& over) {
  if (!base.IsMap() || !over.IsMap()) return YAML::Clone(over);
  YAML::Node out = YAML::Clone(base);
  for (auto it = over.begin(); it != over.end(); ++it) {
    std::string k = it->first.as<std::string>();
    out[k] = out[k] ? merge(out[k], it->second) : YAML::Clone(it->second);
  }
  return out;
}

static YAML::Node load_with_base(const std::string& file, int depth);

// std::filesystem::exists without its exception: a name the OS refuses (too long, a component that
// is a file) is a ConfigError naming it (fuzz_yaml_recipe found `base: <300 characters>` escaping
// as std::filesystem_error).
static bool path_exists(const std::filesystem::path& p, const std::string& where) {
  std::error_code ec;
  const bool e = std::filesystem::exists(p, ec);
  if (ec && ec != std::errc::no_such_file_or_directory && ec != std::errc::not_a_directory)
    throw ConfigError({where + ": '" + p.string() + "' cannot be looked up (" + ec.message() + ")"});
  return e && !ec;
}

// Every mapping key is a plain scalar and appears once: yaml-cpp keeps both copies of a repeated
// key and lookups see the first, so `lr: 1` ... `lr: 2` would silently train at 1 (and merging a
// `base:` chain would see the last). Complex keys (`? [a, b]`) are refused here instead of failing
// later as a raw "bad conversion". The walk also bounds what aliases can make of a small file (found
// by fuzz_yaml_recipe): `a: &x [*x]` is a cycle (endless recursion before), and aliases of aliases
// of lists grow exponentially (a "billion laughs" hang); a recipe nests a few levels and holds a
// few hundred values.
namespace {
constexpr int kMaxDepth = 64;
constexpr int64_t kMaxValues = 100000;
struct KeyWalk {
  const std::string& file;
  Problems* p;
  int64_t values = 0;
  bool stopped = false;
  void walk(const YAML::Node& n, const std::string& path, int depth);
};
}  // namespace

void KeyWalk::walk(const YAML::Node& n, const std::string& path, int depth) {
  if (stopped) return;
  if (depth > kMaxDepth || ++values > kMaxValues) {
    stopped = true;
    const int line = n.Mark().line + 1;
    p->add(file + (line > 0 ? ":" + std::to_string(line) : ""),
           depth > kMaxDepth ? str("'", path, "' nests deeper than ", kMaxDepth, " levels (a YAML alias inside itself?)")
                             : str("more than ", kMaxValues, " values once YAML aliases are expanded (at '", path,
                                   "'); a recipe holds a few hundred"));
    return;
  }
  if (n.IsMap()) {
    std::map<std::string, int> seen;  // key -> line (1-based)
    for (auto it = n.begin(); it != n.end() && !stopped; ++it) {
      const int line = it->first.Mark().line + 1;
      if (!it->first.IsScalar()) {
        p->add(file + ":" + std::to_string(line), str("a mapping key under '", path.empty() ? "<top level>" : path,
                                                      "' is not a plain name (complex YAML keys are not config keys)"));
        continue;
      }
      const std::string k = it->first.Scalar();
      const std::string kp = path.empty() ? k : path + "." + k;
      auto [at, fresh] = seen.emplace(k, line);
      if (!fresh)
        p->add(file + ":" + std::to_string(line), str("key '", kp, "' appears twice in one mapping (first at line ",
                                                      at->second, "); YAML keys must be unique: delete one"));
      walk(it->second, kp, depth + 1);
    }
  } else if (n.IsSequence()) {
    for (size_t i = 0; i < n.size() && !stopped; ++i) walk(n[i], path + "[" + std::to_string(i) + "]", depth + 1);
  }
}

static void check_keys(const YAML::Node& n, const std::string& file, const std::string& path, Problems* p) {
  KeyWalk{file, p}.walk(n, path, 0);
}

YAML::Node load_yaml(const std::string& file, const std::vector<std::string>& overrides) {
  YAML::Node root = load_with_base(file, 0);
  Problems p;
  for (auto& o : overrides) apply_override(root, o, &p);
  p.throw_if_any();
  return root;
}

static YAML::Node load_text(const std::string& text, const std::string& file, int depth);

// `base: other.yaml` (relative to this file's directory) makes this file an overlay of another.
static YAML::Node load_with_base(const std::string& file, int depth) {
  namespace fs = std::filesystem;
  if (depth > 8) throw ConfigError({file + ": `base:` chain deeper than 8 files (a cycle?)"});
  if (!path_exists(file, file)) throw ConfigError({file + ": config file does not exist"});
  std::error_code ec;
  if (fs::is_directory(file, ec)) throw ConfigError({file + ": is a directory; expected a YAML config file"});
  std::ifstream in(file, std::ios::binary);
  if (!in) throw ConfigError({file + ": cannot be read"});
  // Read in bounded chunks: a FIFO (`<(...)`) works, a device such as /dev/zero fails instead of
  // reading forever.
  constexpr size_t kMaxRecipe = size_t{16} << 20;
  std::string text;
  char buf[65536];
  while (in.read(buf, sizeof buf) || in.gcount() > 0) {
    text.append(buf, static_cast<size_t>(in.gcount()));
    if (text.size() > kMaxRecipe) throw ConfigError({file + ": larger than 16 MiB; expected a YAML recipe"});
  }
  return load_text(text, file, depth);
}

// The recipe `file` holds `text`: parse, check keys, resolve `base:` (relative to file's directory).
static YAML::Node load_text(const std::string& text, const std::string& file, int depth) {
  namespace fs = std::filesystem;
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    throw ConfigError({file + ":" + std::to_string(e.mark.line + 1) + ":" + std::to_string(e.mark.column + 1) +
                       ": malformed YAML: " + e.msg});
  }
  if (root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  if (!root.IsMap()) throw ConfigError({file + ": expected a mapping of sections (model:, data:, trainer:, ...)"});
  {
    Problems p;
    check_keys(root, file, "", &p);
    p.throw_if_any();
  }
  if (root["base"]) {
    if (!root["base"].IsScalar()) throw ConfigError({file + ": base: expected the path of another YAML recipe"});
    std::string b = root["base"].Scalar();
    fs::path bp = fs::path(b).is_absolute() ? fs::path(b) : fs::path(file).parent_path() / b;
    if (!path_exists(bp, file + ": base")) throw ConfigError({file + ": base: '" + b + "' does not exist (resolved to " + bp.string() + ")"});
    root.remove("base");
    return merge(load_with_base(bp.string(), depth + 1), root);
  }
  return root;
}

YAML::Node load_yaml_text(const std::string& text, const std::string& name) { return load_text(text, name, 0); }

void apply_override(YAML::Node& root, const std::string& a, Problems* problems) {
  auto eq = a.find('=');
  if (eq == std::string::npos || eq == 0) {
    problems->add("<override '" + a + "'>", "expected key.path=value");
    return;
  }
  std::string key = a.substr(0, eq), value = a.substr(eq + 1);
  YAML::Node v;
  try {
    v = YAML::Load(value);
  } catch (const YAML::Exception& e) {
    problems->add(key, "override value '" + value + "' is not valid YAML: " + e.msg);
    return;
  }
  {  // the value obeys the same key rules as a recipe file
    Problems kp;
    check_keys(v, "override '" + a + "'", key, &kp);
    if (!kp.empty()) {
      problems->items.insert(problems->items.end(), kp.items.begin(), kp.items.end());
      return;
    }
  }
  std::vector<std::string> parts;
  std::stringstream ss(key);
  for (std::string s; std::getline(ss, s, '.');) parts.push_back(s);
  // yaml-cpp nodes are handles: walk by re-binding through a vector of nodes.
  std::vector<YAML::Node> chain{root};
  std::string walked;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    walked += (i ? "." : "") + parts[i];
    YAML::Node next = chain.back()[parts[i]];
    if (!next || next.IsNull()) {
      chain.back()[parts[i]] = YAML::Node(YAML::NodeType::Map);
      next = chain.back()[parts[i]];
    } else if (!next.IsMap()) {
      problems->add(walked, "override '" + a + "' descends into a value that is not a mapping");
      return;
    }
    chain.push_back(next);
  }
  chain.back()[parts.back()] = v;
}

std::string dump(const YAML::Node& node) {
  YAML::Emitter e;
  e << node;
  return std::string(e.c_str()) + "\n";
}

}  // namespace cfg
}  // namespace qf
