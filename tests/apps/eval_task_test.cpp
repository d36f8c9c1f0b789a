// `qforge eval --task` from the command line: a malformed task file is refused before any model is
// read, exit code 1, naming the file and the line and what was expected; option misuse is refused.
// (Scores are checked against lm-evaluation-harness in tests/interop/test_lm_eval.py.)
#include <gtest/gtest.h>

#include <string>

#include "tests/apps/qforge_cli.h"
#include "tests/test_util.h"

namespace {

qf::testing::CliOut qforge(const std::string& args) { return qf::testing::run_qforge(args, ""); }

TEST(EvalTask, MalformedTaskFileNamesFileAndLine) {
  qf::testing::TmpDir tmp("qf_eval_task");
  const std::string bad = tmp / "bad.jsonl";
  qf::testing::write_text(bad, "{\"query\": \"a\", \"choices\": [\"b\", \"c\"], \"gold\": 0}\n"
                               "{\"query\": \"d\", \"choices\": [\"e\", \"f\"], \"gold\": 5}\n");
  // The model path does not exist: the task file is checked first.
  auto r = qforge("eval " + tmp / "no_model" + " --task " + bad);
  EXPECT_EQ(r.rc, 1) << r.text;
  EXPECT_NE(r.text.find(bad + ":2: 'gold': 5 is not an index into the 2 choices (0..1)"), std::string::npos) << r.text;
  const std::string broken = tmp / "broken.jsonl";
  qf::testing::write_text(broken, "{\"text\": \"fine\"}\n{\"text\": \"cut off\n");
  r = qforge("eval " + tmp / "no_model" + " --task " + broken);
  EXPECT_EQ(r.rc, 1) << r.text;
  EXPECT_NE(r.text.find(broken + ":2: not a JSON document"), std::string::npos) << r.text;
  // A perplexity task takes no examples; --task excludes the perplexity options.
  qf::testing::write_text(broken, "{\"text\": \"fine\"}\n");
  r = qforge("eval " + tmp / "no_model" + " --task " + broken + " --num-fewshot 2");
  EXPECT_EQ(r.rc, 1) << r.text;
  EXPECT_NE(r.text.find("is a perplexity task (field 'text'), which takes no examples"), std::string::npos) << r.text;
  r = qforge("eval " + tmp / "no_model" + " --task " + broken + " --text " + broken);
  EXPECT_NE(r.rc, 0) << r.text;
  EXPECT_NE(r.text.find("--text excludes --task"), std::string::npos) << r.text;
  r = qforge("eval " + tmp / "no_model" + " --task missing_task_name");
  EXPECT_EQ(r.rc, 1) << r.text;
  EXPECT_NE(r.text.find("--task missing_task_name: no such task file"), std::string::npos) << r.text;
}

}  // namespace
