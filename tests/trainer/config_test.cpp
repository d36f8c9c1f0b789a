// Config validation: every shipped recipe validates; each kind of bad input is reported with its
// full key path, all problems at once; overrides keep YAML types.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/fs.h"
#include "trainer/run_config.h"

namespace sfs = std::filesystem;
using namespace qf;

namespace {

std::string src(const std::string& rel) { return std::string(QFORGE_SOURCE_DIR) + "/" + rel; }

std::vector<std::string> problems_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  YAML::Node root = YAML::Load(yaml);
  cfg::Problems p;
  for (auto& o : overrides) cfg::apply_override(root, o, &p);
  if (!p.empty()) return p.items;
  try {
    trainer::parse_run_config(root, "<test>");
  } catch (const ConfigError& e) {
    return e.problems;
  }
  return {};
}

bool any_contains(const std::vector<std::string>& v, const std::string& needle) {
  for (auto& s : v)
    if (s.find(needle) != std::string::npos) return true;
  return false;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (auto& x : v) s += x + "\n";
  return s;
}

const char* kBase = R"(
tokenizer: {path: /nonexistent/tok.model, train: {enabled: true, sources: [CORPUS]}}
data: {sources: [{path: CORPUS}], seq_len: 64}
)";

std::string base() {
  std::string y = kBase;
  std::string corpus = src("CMakeLists.txt");  // any existing file
  for (size_t p; (p = y.find("CORPUS")) != std::string::npos;) y.replace(p, 6, corpus);
  return y;
}

TEST(Config, EveryShippedRecipeValidates) {
  int n = 0;
  for (auto& e : sfs::directory_iterator(src("configs"))) {
    if (e.path().extension() != ".yaml") continue;
    ++n;
    // Paths in recipes are relative to the repository root.
    auto cwd = sfs::current_path();
    sfs::current_path(QFORGE_SOURCE_DIR);
    try {
      // run.init_from names the output of an earlier stage (e.g. runs/demo/pretrain), absent in a test.
      auto c = trainer::load_run_config(e.path().string(), {"run.init_from="});
      EXPECT_FALSE(c.resolved.IsNull());
    } catch (const std::exception& ex) {
      ADD_FAILURE() << e.path() << ": " << ex.what();
    }
    sfs::current_path(cwd);
    // Each recipe is headed by the command that runs it.
    std::ifstream f(e.path());
    std::string first;
    std::getline(f, first);
    EXPECT_NE(first.find("qforge"), std::string::npos) << e.path() << " first line: " << first;
  }
  EXPECT_GE(n, 1);
}

TEST(Config, ValidBaseHasNoProblems) { EXPECT_TRUE(problems_of(base()).empty()) << join(problems_of(base())); }

TEST(Config, AllProblemsReportedAtOnceWithKeyPaths) {
  auto p = problems_of(base(), {"trainer.max_stepz=5", "model.dim=abc", "trainer.optim.lr=-1",
                                "trainer.precision=fp8", "model.n_kv_heads=3", "data.seq_len=4096"});
  EXPECT_EQ(p.size(), 6u) << join(p);
  EXPECT_TRUE(any_contains(p, "trainer.max_stepz: unknown key")) << join(p);
  EXPECT_TRUE(any_contains(p, "model.dim: expected an integer")) << join(p);
  EXPECT_TRUE(any_contains(p, "trainer.optim.lr: value -1 is out of range")) << join(p);
  EXPECT_TRUE(any_contains(p, "trainer.precision: 'fp8' is not allowed; expected one of fp32|bf16")) << join(p);
  EXPECT_TRUE(any_contains(p, "model.n_kv_heads")) << join(p);
  EXPECT_TRUE(any_contains(p, "data.seq_len: 4096 exceeds model.max_seq_len")) << join(p);
}

TEST(Config, UnknownSectionAndNestedUnknownKey) {
  auto p = problems_of(base() + "modle: {dim: 3}\n", {"trainer.schedule.kind=cosine"});
  EXPECT_TRUE(any_contains(p, "modle: unknown key")) << join(p);
  EXPECT_TRUE(any_contains(p, "trainer.schedule.kind: unknown key")) << join(p);
}

TEST(Config, MissingTokenizerFileWithoutTraining) {
  auto p = problems_of(base(), {"tokenizer.train.enabled=false"});
  EXPECT_TRUE(any_contains(p, "tokenizer.path")) << join(p);
  EXPECT_TRUE(any_contains(p, "/nonexistent/tok.model")) << join(p);
}

TEST(Config, MissingCorpusPath) {
  auto p = problems_of(base(), {"data.sources=[{path: /no/such/corpus.txt}]"});
  EXPECT_TRUE(any_contains(p, "data.sources[0].path")) << join(p);
  EXPECT_TRUE(any_contains(p, "/no/such/corpus.txt")) << join(p);
}

TEST(Config, InconsistentCombinations) {
  auto p = problems_of(base(), {"model.family=gpt2", "model.n_kv_heads=2", "model.tie_embeddings=false"});
  EXPECT_TRUE(any_contains(p, "model.n_kv_heads: gpt2")) << join(p);
  EXPECT_TRUE(any_contains(p, "model.tie_embeddings")) << join(p);
  auto q = problems_of(base(), {"trainer.max_steps=10", "trainer.schedule.warmup_steps=50"});
  EXPECT_TRUE(any_contains(q, "trainer.schedule.warmup_steps")) << join(q);
  auto r = problems_of(base(), {"trainer.optim.betas=[0.9]"});
  EXPECT_TRUE(any_contains(r, "trainer.optim.betas")) << join(r);
}

TEST(Config, MalformedYamlNamesFileLineAndColumn) {
  auto dir = sfs::temp_directory_path() / ("qf_cfg_" + std::to_string(::getpid()));
  sfs::create_directories(dir);
  auto f = (dir / "bad.yaml").string();
  std::ofstream(f) << "model:\n  dim: 64\n  n_layers: [1, 2\ntrainer: {}\n";
  try {
    cfg::load_yaml(f, {});
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find(f + ":"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("malformed YAML"), std::string::npos) << e.what();
  }
  EXPECT_THROW(cfg::load_yaml((dir / "missing.yaml").string(), {}), ConfigError);
  fs::remove_tree(dir.string());
}

TEST(Config, OverridesKeepTypesAndCreateSections) {
  YAML::Node root = YAML::Load(base());
  cfg::Problems p;
  cfg::apply_override(root, "trainer.optim.betas=[0.8, 0.9]", &p);
  cfg::apply_override(root, "model.n_layers=3", &p);
  cfg::apply_override(root, "novalue", &p);
  EXPECT_EQ(p.items.size(), 1u);
  auto c = trainer::parse_run_config(root, "<test>");
  EXPECT_EQ(c.model.n_layers, 3);
  EXPECT_DOUBLE_EQ(c.trainer.optim.betas[0], 0.8);
}

// Found by fuzz_yaml_recipe: an override value with a complex key got past the key checks and made
// Reader::finish throw yaml-cpp's "bad conversion" instead of a ConfigError.
TEST(Config, OverrideValuesObeyTheKeyRules) {
  YAML::Node root = YAML::Load(base());
  cfg::Problems p;
  cfg::apply_override(root, "model={[1]: 2}", &p);
  cfg::apply_override(root, "trainer.optim={lr: 1, lr: 2}", &p);
  ASSERT_EQ(p.items.size(), 2u);
  EXPECT_NE(p.items[0].find("not a plain name"), std::string::npos) << p.items[0];
  EXPECT_NE(p.items[1].find("key 'trainer.optim.lr' appears twice"), std::string::npos) << p.items[1];
  EXPECT_TRUE(problems_of(base()).empty());
  // A tree built by hand with a complex key is a problem at finish(), not a yaml-cpp exception.
  YAML::Node odd = YAML::Load("{[1]: 2}");
  cfg::Problems q;
  cfg::Reader r(odd, "", &q, YAML::Node(YAML::NodeType::Map));
  r.finish();
  EXPECT_EQ(q.items.size(), 1u);
}

// load_yaml_text is what load_yaml does after reading the file: same errors, `base:` relative to
// the name's directory.
TEST(Config, LoadYamlTextMatchesLoadYaml) {
  auto dir = sfs::temp_directory_path() / ("qf_cfg_text_" + std::to_string(::getpid()));
  sfs::create_directories(dir);
  std::ofstream((dir / "b.yaml").string()) << "model:\n  dim: 64\n  n_layers: 2\n";
  const std::string over = "base: b.yaml\nmodel:\n  n_layers: 3\n";
  std::ofstream((dir / "o.yaml").string()) << over;
  EXPECT_EQ(cfg::dump(cfg::load_yaml_text(over, (dir / "o.yaml").string())),
            cfg::dump(cfg::load_yaml((dir / "o.yaml").string(), {})));
  EXPECT_EQ(cfg::load_yaml_text(over, (dir / "o.yaml").string())["model"]["n_layers"].as<int>(), 3);
  EXPECT_THROW(cfg::load_yaml_text("a: 1\na: 2\n", (dir / "x.yaml").string()), ConfigError);
  EXPECT_THROW(cfg::load_yaml_text("a: [1\n", (dir / "x.yaml").string()), ConfigError);
  EXPECT_THROW(cfg::load_yaml_text("- 1\n", (dir / "x.yaml").string()), ConfigError);
  // Found by fuzz_yaml_recipe: an alias inside itself recursed without end (stack overflow), and
  // aliases of aliases expanded exponentially (a hang).
  EXPECT_THROW(cfg::load_yaml_text("a: &x [*x]\n", (dir / "x.yaml").string()), ConfigError);
  EXPECT_THROW(cfg::load_yaml_text("a: &x {b: *x}\n", (dir / "x.yaml").string()), ConfigError);
  std::string laughs = "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1]\n";
  for (int i = 1; i < 8; ++i) {
    const std::string prev = "*a" + std::to_string(i - 1);
    laughs += "a" + std::to_string(i) + ": &a" + std::to_string(i) + " [" + prev;
    for (int j = 1; j < 8; ++j) laughs += ", " + prev;
    laughs += "]\n";
  }
  try {
    cfg::load_yaml_text(laughs, (dir / "x.yaml").string());
    ADD_FAILURE() << "accepted 8^8 aliased values";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("once YAML aliases are expanded"), std::string::npos) << e.what();
  }
  cfg::Problems p;
  YAML::Node root = YAML::Load(base());
  cfg::apply_override(root, "model=&x [*x]", &p);
  EXPECT_EQ(p.items.size(), 1u);
  fs::remove_tree(dir.string());
}

TEST(Config, ResolvedConfigHasDefaultsAndReparsesIdentically) {
  auto c = trainer::parse_run_config(YAML::Load(base()), "<test>");
  EXPECT_EQ(c.resolved["trainer"]["max_steps"].as<int64_t>(), 1000);
  EXPECT_EQ(c.resolved["model"]["family"].as<std::string>(), "llama");
  auto again = trainer::parse_run_config(YAML::Load(cfg::dump(c.resolved)), "<resolved>");
  EXPECT_EQ(again.hash(), c.hash());
}

}  // namespace
