// A run's metrics, written by rank 0: <run>/metrics.jsonl (one JSON object per line, each with a
// "step") and TensorBoard events under <run>/tb (every numeric key but "step" as a scalar).
// Invariants: a write that fails (a full disk, a removed directory) is an InputError naming the
// file, never a silently missing line; resuming at step N keeps the lines of steps <= N byte for
// byte and drops the rest (what a run that did not survive wrote).
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <string>

namespace qf::core {
class TensorBoardWriter;
}

namespace qf::trainer {

class MetricsLog {
 public:
  MetricsLog();
  ~MetricsLog();
  // Starts writing under `run_dir`: `resume_step` < 0 starts a fresh metrics.jsonl (an old one is
  // removed); otherwise keep_until(resume_step) first. Opens the TensorBoard writer.
  void open(const std::string& run_dir, int64_t resume_step);
  // Drops the lines of `path` whose step is after `step`. A last line without its newline (a write
  // a kill interrupted) is dropped with a warning; any other line that is not a JSON object with an
  // integer "step" is an InputError naming the file and line (fix or delete the file to resume).
  static void keep_until(const std::string& path, int64_t step);
  void write(const nlohmann::json& j);
  void flush();
  void close();  // flushes; later writes are errors
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::unique_ptr<core::TensorBoardWriter> tb_;
};

}  // namespace qf::trainer
