// Terminal progress bar on stderr. Invariant: output is throttled (TTY: redraw in place at most
// every 100 ms; non-TTY: a plain line at most every 10% of progress or every 30 s, whichever comes
// first) and the final state is always written exactly once, by finish() or the destructor.
// ETA and rate count only units done since `start` (resume-aware). QFORGE_PROGRESS=0 disables all
// output; QFORGE_PROGRESS=tty forces in-place TTY mode. Not thread-safe.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace qf::core {

class ProgressBar {
 public:
  // label e.g. "train"; total = number of units (<= 0: unknown, no percentage/ETA);
  // start = units already done (resume). Throws qf::Error if start < 0.
  ProgressBar(std::string label, int64_t total, int64_t start = 0, std::string unit = "step");
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  // done = absolute units done; postfix e.g. "loss 3.21 | 12.3k tok/s". Cheap to call every step.
  void update(int64_t done, const std::string& postfix = "");
  // Writes the final line + newline; idempotent. An empty postfix keeps the last update()'s one.
  void finish(const std::string& postfix = "");
  ~ProgressBar();

  // "1h02m03s", "4m05s", "12s" (rounded to whole seconds); "?" for negative or non-finite input.
  static std::string format_duration(double seconds);
  // Compact count/rate: 950 -> "950.0", 12345 -> "12.3k", 2.5e6 -> "2.5M".
  static std::string format_rate(double r);

 private:
  using Clock = std::chrono::steady_clock;
  enum class Mode { kOff, kTty, kPlain };

  std::string render(double elapsed_s, int term_cols) const;
  void draw(Clock::time_point now, bool final);

  std::string label_;
  std::string unit_;
  int64_t total_;
  int64_t start_;
  int64_t done_;
  std::string postfix_;
  Mode mode_;
  bool finished_ = false;
  Clock::time_point t0_;
  Clock::time_point last_draw_;
  bool drawn_ = false;
  int64_t next_plain_at_;  // plain mode: print when done_ reaches this (next 10% boundary)
};

}  // namespace qf::core
