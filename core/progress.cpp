#include "core/progress.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>

#include "core/error.h"

namespace qf::core {
namespace {

constexpr auto kTtyInterval = std::chrono::milliseconds(100);
constexpr auto kPlainInterval = std::chrono::seconds(30);
constexpr int kBarWidth = 20;
constexpr int64_t kNever = std::numeric_limits<int64_t>::max();

// Smallest 10%-of-total boundary strictly above `done` (kNever when total is unknown).
int64_t next_tenth(int64_t done, int64_t total) {
  if (total <= 0) return kNever;
  for (int64_t k = 1; k <= 10; ++k) {
    // ceil(k * total / 10) without overflow for any realistic total.
    int64_t b = static_cast<int64_t>(std::ceil(static_cast<long double>(total) * k / 10.0L));
    if (b > done) return b;
  }
  return kNever;
}

std::string fmt_rate_impl(double r) {
  char buf[32];
  if (r >= 1e6)
    std::snprintf(buf, sizeof buf, "%.1fM", r / 1e6);
  else if (r >= 1e4)
    std::snprintf(buf, sizeof buf, "%.1fk", r / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.1f", r);
  return buf;
}

// Keeps at most `cols` display columns, counting one per UTF-8 code point (bar glyphs are 1 wide).
std::string truncate_cols(const std::string& s, int cols) {
  if (cols <= 0) return s;
  int n = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if ((c & 0xC0) != 0x80) {  // start of a code point
      if (n == cols) return s.substr(0, i);
      ++n;
    }
  }
  return s;
}

int terminal_cols() {
  struct winsize ws;
  if (::ioctl(2, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return 0;  // unknown: no truncation
}

}  // namespace

ProgressBar::ProgressBar(std::string label, int64_t total, int64_t start, std::string unit)
    : label_(std::move(label)),
      unit_(std::move(unit)),
      total_(total),
      start_(start),
      done_(start),
      t0_(Clock::now()),
      last_draw_(t0_),
      next_plain_at_(next_tenth(start, total)) {
  QF_CHECK(start >= 0, "ProgressBar '", label_, "': start must be >= 0, got ", start);
  const char* env = std::getenv("QFORGE_PROGRESS");
  std::string e = env ? env : "";
  if (e == "0")
    mode_ = Mode::kOff;
  else if (e == "tty")
    mode_ = Mode::kTty;
  else
    mode_ = ::isatty(2) ? Mode::kTty : Mode::kPlain;
}

ProgressBar::~ProgressBar() {
  try {
    finish();
  } catch (...) {
  }
}

std::string ProgressBar::format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  long long s = std::llround(seconds);
  long long h = s / 3600, m = (s / 60) % 60, sec = s % 60;
  char buf[48];
  if (h > 0)
    std::snprintf(buf, sizeof buf, "%lldh%02lldm%02llds", h, m, sec);
  else if (m > 0)
    std::snprintf(buf, sizeof buf, "%lldm%02llds", m, sec);
  else
    std::snprintf(buf, sizeof buf, "%llds", sec);
  return buf;
}

std::string ProgressBar::render(double elapsed_s, int term_cols) const {
  const int64_t advanced = done_ - start_;
  const double rate = (elapsed_s > 0 && advanced > 0) ? advanced / elapsed_s : 0.0;
  std::string rate_s;
  if (rate <= 0)
    rate_s = "? " + unit_ + "/s";
  else if (rate < 1)
    rate_s = str(fmt_rate_impl(1.0 / rate), " s/", unit_);
  else
    rate_s = str(fmt_rate_impl(rate), " ", unit_, "/s");

  std::string line = label_;
  if (total_ > 0) {
    const double frac = std::clamp(static_cast<double>(done_) / static_cast<double>(total_), 0.0, 1.0);
    char pct[8];
    std::snprintf(pct, sizeof pct, "%3d%%", static_cast<int>(std::floor(frac * 100.0)));
    const int filled = static_cast<int>(std::floor(frac * kBarWidth));
    std::string bar;
    for (int i = 0; i < kBarWidth; ++i) bar += i < filled ? "\u2588" : "\u2591";
    std::string eta;
    if (done_ >= total_)
      eta = format_duration(0);
    else if (rate > 0)
      eta = format_duration(static_cast<double>(total_ - done_) / rate);
    else
      eta = "?";
    line += str(" ", pct, " |", bar, "| ", done_, "/", total_, " ", unit_, " [",
                format_duration(elapsed_s), "<", eta, ", ", rate_s, "]");
  } else {
    line += str(" ", done_, " ", unit_, " [", format_duration(elapsed_s), ", ", rate_s, "]");
  }
  if (!postfix_.empty()) line += " " + postfix_;
  return truncate_cols(line, term_cols > 1 ? term_cols - 1 : 0);
}

void ProgressBar::draw(Clock::time_point now, bool final) {
  const double elapsed = std::chrono::duration<double>(now - t0_).count();
  if (mode_ == Mode::kTty) {
    const std::string line = render(elapsed, terminal_cols());
    std::fprintf(stderr, "\r\033[K%s%s", line.c_str(), final ? "\n" : "");
  } else {
    const std::string line = render(elapsed, 0);
    std::fprintf(stderr, "%s\n", line.c_str());
    next_plain_at_ = next_tenth(done_, total_);
  }
  std::fflush(stderr);
  last_draw_ = now;
  drawn_ = true;
}

void ProgressBar::update(int64_t done, const std::string& postfix) {
  if (mode_ == Mode::kOff || finished_) return;
  done_ = done;
  postfix_ = postfix;
  const auto now = Clock::now();
  if (mode_ == Mode::kTty) {
    if (!drawn_ || now - last_draw_ >= kTtyInterval) draw(now, false);
  } else {
    // The 100% line is left to finish(), so a completed run logs it once.
    if (total_ > 0 && done_ >= total_) return;
    if (done_ >= next_plain_at_ || now - last_draw_ >= kPlainInterval) draw(now, false);
  }
}

void ProgressBar::finish(const std::string& postfix) {
  if (finished_) return;
  finished_ = true;
  if (!postfix.empty()) postfix_ = postfix;
  if (mode_ == Mode::kOff) return;
  draw(Clock::now(), true);
}

std::string ProgressBar::format_rate(double r) { return fmt_rate_impl(r); }

}  // namespace qf::core
