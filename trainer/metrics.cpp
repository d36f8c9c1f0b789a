#include "trainer/metrics.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/tensorboard.h"

namespace qf::trainer {
namespace sfs = std::filesystem;

MetricsLog::MetricsLog() = default;
MetricsLog::~MetricsLog() = default;

void MetricsLog::open(const std::string& run_dir, int64_t resume_step) {
  path_ = run_dir + "/metrics.jsonl";
  if (resume_step >= 0) {
    keep_until(path_, resume_step);
  } else if (sfs::exists(path_)) {
    std::error_code ec;
    sfs::remove(path_, ec);
    QF_CHECK_INPUT(!ec, "cannot remove the previous run's '", path_, "': ", ec.message());
  }
  tb_ = std::make_unique<core::TensorBoardWriter>(run_dir + "/tb");
}

void MetricsLog::keep_until(const std::string& path, int64_t step) {
  if (!sfs::exists(path)) return;
  const std::string text = fs::read_file(path);
  std::string kept;
  size_t at = 0;
  int64_t line_no = 0;
  while (at < text.size()) {
    ++line_no;
    const size_t nl = text.find('\n', at);
    if (nl == std::string::npos) {
      log::warn(path, ":", line_no, ": dropped an unfinished last line (a write the previous run's end interrupted)");
      break;
    }
    const std::string line = text.substr(at, nl - at);
    at = nl + 1;
    const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    QF_CHECK_INPUT(j.is_object() && j.contains("step") && j["step"].is_number_integer(), path, ":", line_no,
                   ": not a metrics line (a JSON object with an integer \"step\"); fix or delete ", path,
                   " to resume (it only records metrics)");
    if (j["step"].get<int64_t>() <= step) kept += line + "\n";
  }
  fs::write_atomic(path, kept);
}

void MetricsLog::write(const nlohmann::json& j) {
  QF_CHECK(!path_.empty() && tb_, "MetricsLog: write before open or after close");
  {
    std::ofstream f(path_, std::ios::app);
    f << j.dump() << "\n";
    f.flush();
    QF_CHECK_INPUT(f.good(), "cannot append to '", path_, "': ", std::strerror(errno),
                   " (the run's metrics would be lost; free space or fix the directory and resume)");
  }
  const int64_t step = j.value("step", int64_t(0));
  for (auto it = j.begin(); it != j.end(); ++it)
    if (it.key() != "step" && it->is_number()) tb_->add_scalar(it.key(), it->get<double>(), step);
  tb_->flush();
}

void MetricsLog::flush() {
  if (tb_) tb_->flush();
}

void MetricsLog::close() {
  if (tb_) tb_->flush();
  tb_.reset();
}

}  // namespace qf::trainer
