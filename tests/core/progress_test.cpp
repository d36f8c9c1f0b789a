// Progress bar: duration formatting, non-TTY line throttling (10% steps + one final line), resume-
// aware ETA, QFORGE_PROGRESS=0 / =tty. stderr is captured, so it is never a TTY here.
#include "core/progress.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"

namespace {

using qf::core::ProgressBar;

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

std::string full_bar(int filled) {
  std::string b;
  for (int i = 0; i < 20; ++i) b += i < filled ? "\u2588" : "\u2591";
  return b;
}

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

// Sets QFORGE_PROGRESS for the test and restores the caller's value afterwards.
class ProgressTest : public testing::Test {
 protected:
  void SetUp() override {
    const char* v = std::getenv("QFORGE_PROGRESS");
    had_ = v != nullptr;
    if (had_) saved_ = v;
    ::unsetenv("QFORGE_PROGRESS");
  }
  void TearDown() override {
    if (had_)
      ::setenv("QFORGE_PROGRESS", saved_.c_str(), 1);
    else
      ::unsetenv("QFORGE_PROGRESS");
  }
  bool had_ = false;
  std::string saved_;
};

TEST(ProgressFormat, Durations) {
  EXPECT_EQ(ProgressBar::format_duration(0), "0s");
  EXPECT_EQ(ProgressBar::format_duration(12), "12s");
  EXPECT_EQ(ProgressBar::format_duration(12.4), "12s");
  EXPECT_EQ(ProgressBar::format_duration(59.6), "1m00s");
  EXPECT_EQ(ProgressBar::format_duration(245), "4m05s");
  EXPECT_EQ(ProgressBar::format_duration(3600), "1h00m00s");
  EXPECT_EQ(ProgressBar::format_duration(3723), "1h02m03s");
  EXPECT_EQ(ProgressBar::format_duration(90000), "25h00m00s");
  EXPECT_EQ(ProgressBar::format_duration(-1), "?");
  EXPECT_EQ(ProgressBar::format_duration(std::nan("")), "?");
  EXPECT_EQ(ProgressBar::format_duration(std::numeric_limits<double>::infinity()), "?");
}

TEST_F(ProgressTest, PlainModePrintsEveryTenthAndOneFinalLine) {
  testing::internal::CaptureStderr();
  {
    ProgressBar bar("train", 1000);
    for (int i = 1; i <= 1000; ++i) bar.update(i, "loss 3.21");
    bar.finish();
    bar.finish();  // idempotent; the destructor adds nothing either
  }
  const std::string out = testing::internal::GetCapturedStderr();
  EXPECT_EQ(out.find('\r'), std::string::npos);
  EXPECT_EQ(out.find('\033'), std::string::npos);
  const auto lines = lines_of(out);
  ASSERT_EQ(lines.size(), 10u) << out;  // 10%..90% + final
  for (int k = 1; k <= 9; ++k) {
    const std::string want = qf::str("train  ", k * 10, "% |", full_bar(2 * k), "| ", k * 100,
                                     "/1000 step [");
    EXPECT_TRUE(starts_with(lines[k - 1], want)) << lines[k - 1] << "\nwant prefix: " << want;
  }
  const std::string& last = lines.back();
  const std::string prefix = "train 100% |" + full_bar(20) + "| 1000/1000 step [0s<0s, ";
  EXPECT_TRUE(starts_with(last, prefix)) << last;
  EXPECT_TRUE(ends_with(last, " step/s] loss 3.21")) << last;
  EXPECT_TRUE(ends_with(out, "\n"));
}

TEST_F(ProgressTest, FinishPostfixReplacesLastOne) {
  testing::internal::CaptureStderr();
  {
    ProgressBar bar("eval", 4, 0, "batch");
    bar.update(1, "old");
    bar.finish("ppl 12.5");
  }
  const auto lines = lines_of(testing::internal::GetCapturedStderr());
  ASSERT_FALSE(lines.empty());
  EXPECT_TRUE(starts_with(lines.back(), "eval  25% |" + full_bar(5) + "| 1/4 batch [")) << lines.back();
  EXPECT_TRUE(ends_with(lines.back(), "] ppl 12.5")) << lines.back();
}

TEST_F(ProgressTest, DestructorWritesFinalLine) {
  testing::internal::CaptureStderr();
  { ProgressBar bar("x", 10); }
  const auto lines = lines_of(testing::internal::GetCapturedStderr());
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_TRUE(starts_with(lines[0], "x   0% |" + full_bar(0) + "| 0/10 step [0s<?, ? step/s]"))
      << lines[0];
}

TEST_F(ProgressTest, ResumeCountsOnlyNewUnits) {
  testing::internal::CaptureStderr();
  {
    ProgressBar bar("train", 1000, 500);
    for (int i = 501; i <= 1000; ++i) bar.update(i);
  }
  const auto lines = lines_of(testing::internal::GetCapturedStderr());
  ASSERT_EQ(lines.size(), 5u);  // 60%, 70%, 80%, 90%, final
  EXPECT_TRUE(starts_with(lines[0], "train  60%")) << lines[0];
  EXPECT_TRUE(starts_with(lines[4], "train 100%")) << lines[4];
}

TEST_F(ProgressTest, EtaUsesRateSinceStart) {
  ::setenv("QFORGE_PROGRESS", "tty", 1);
  testing::internal::CaptureStderr();
  {
    ProgressBar bar("train", 1000, 500);
    std::this_thread::sleep_for(std::chrono::milliseconds(1000));
    // 250 units in ~1 s since construction: 250 left => ETA ~1 s (a rate counted from 0 gives 0s).
    bar.update(750);
  }
  const std::string out = testing::internal::GetCapturedStderr();
  EXPECT_NE(out.find("750/1000 step [1s<1s, "), std::string::npos) << out;
}

TEST_F(ProgressTest, ForcedTtyRedrawsInPlace) {
  ::setenv("QFORGE_PROGRESS", "tty", 1);
  testing::internal::CaptureStderr();
  {
    ProgressBar bar("train", 1000);
    for (int i = 1; i <= 1000; ++i) bar.update(i, "loss 1.00");
  }
  const std::string out = testing::internal::GetCapturedStderr();
  EXPECT_TRUE(starts_with(out, "\r\033[K")) << out;
  EXPECT_TRUE(ends_with(out, " loss 1.00\n")) << out;
  EXPECT_EQ(lines_of(out).size(), 1u);  // one physical line, redrawn
  // Throttled to 100 ms: the loop takes far less, so: first draw + final draw.
  size_t draws = 0;
  for (size_t p = out.find('\r'); p != std::string::npos; p = out.find('\r', p + 1)) ++draws;
  EXPECT_LE(draws, 3u) << out;
  const size_t final_at = out.rfind('\r');
  EXPECT_NE(out.find("1000/1000 step", final_at), std::string::npos) << out;
}

TEST_F(ProgressTest, DisabledByEnv) {
  ::setenv("QFORGE_PROGRESS", "0", 1);
  testing::internal::CaptureStderr();
  {
    ProgressBar bar("train", 100);
    for (int i = 1; i <= 100; ++i) bar.update(i, "x");
    bar.finish("done");
  }
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");
}

TEST_F(ProgressTest, UnknownTotalShowsCountOnly) {
  testing::internal::CaptureStderr();
  {
    ProgressBar bar("read", 0, 0, "doc");
    bar.update(7);
  }
  const auto lines = lines_of(testing::internal::GetCapturedStderr());
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_TRUE(starts_with(lines[0], "read 7 doc [0s, ")) << lines[0];
}

TEST_F(ProgressTest, NegativeStartThrows) {
  EXPECT_THROW(ProgressBar("x", 10, -1), qf::Error);
}

}  // namespace
