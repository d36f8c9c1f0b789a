// TensorBoard event-file writer with no protobuf/TensorFlow dependency. Invariant: the file is a
// sequence of TFRecords (uint64 LE length, uint32 LE masked crc32c of the length, data, uint32 LE
// masked crc32c of the data) whose data are hand-encoded tensorflow.Event protos; the first record
// is Event{wall_time, file_version: "brain.Event:2"}. Writes are buffered; flush() makes every
// record written so far readable. Not thread-safe.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

namespace qf::core {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), software table implementation.
uint32_t crc32c(const void* data, size_t n);
// TFRecord masking: ((crc >> 15) | (crc << 17)) + 0xa282ead8.
uint32_t masked_crc32c(const void* data, size_t n);

class TensorBoardWriter {
 public:
  // Creates logdir (and parents) and the file
  // <logdir>/events.out.tfevents.<unix_seconds>.<hostname>.<pid>.qforge (".N" appended if that
  // exact name already exists). Throws qf::InputError naming the path if it cannot be created.
  explicit TensorBoardWriter(const std::string& logdir);
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  // Appends Event{wall_time, step, summary{value{tag, simple_value: float(value)}}}.
  // Throws qf::InputError naming the path if the write fails.
  void add_scalar(const std::string& tag, double value, int64_t step);
  // fflush of the buffered records; throws qf::InputError naming the path on failure.
  void flush();
  const std::string& path() const { return path_; }
  ~TensorBoardWriter();  // flushes and closes; never throws

 private:
  void write_record(const std::string& data);

  std::string path_;
  std::FILE* file_ = nullptr;
};

}  // namespace qf::core
