#include "core/tensorboard.h"

#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "core/error.h"

namespace qf::core {
namespace {

constexpr std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ 0x82F63B78u : (c >> 1);
    t[i] = c;
  }
  return t;
}
constexpr std::array<uint32_t, 256> kCrcTable = make_crc32c_table();

// --- Minimal protobuf encoding (only what Event/Summary need). ---
void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_le(std::string& out, uint64_t v, int nbytes) {
  for (int i = 0; i < nbytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
void put_key(std::string& out, uint32_t field, uint32_t wire_type) {
  put_varint(out, (static_cast<uint64_t>(field) << 3) | wire_type);
}
void put_bytes(std::string& out, uint32_t field, const std::string& bytes) {
  put_key(out, field, 2);
  put_varint(out, bytes.size());
  out += bytes;
}
void put_double(std::string& out, uint32_t field, double d) {
  uint64_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  put_key(out, field, 1);
  put_le(out, bits, 8);
}
void put_float(std::string& out, uint32_t field, float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  put_key(out, field, 5);
  put_le(out, bits, 4);
}

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5 }.
std::string event_header(int64_t step) {
  std::string ev;
  put_double(ev, 1, unix_now());
  if (step != 0) {
    put_key(ev, 2, 0);
    put_varint(ev, static_cast<uint64_t>(step));  // int64: negative values take 10 bytes
  }
  return ev;
}

}  // namespace

uint32_t crc32c(const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = kCrcTable[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(const void* data, size_t n) {
  const uint32_t c = crc32c(data, n);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

TensorBoardWriter::TensorBoardWriter(const std::string& logdir) {
  std::error_code ec;
  std::filesystem::create_directories(logdir, ec);
  if (ec || !std::filesystem::is_directory(logdir))
    throw InputError(str("cannot create TensorBoard log directory '", logdir,
                         "': ", ec ? ec.message() : "not a directory"));
  char host[256] = {0};
  if (::gethostname(host, sizeof host - 1) != 0 || host[0] == '\0') std::strcpy(host, "localhost");
  for (char* h = host; *h; ++h)
    if (*h == '/') *h = '_';
  const auto secs = static_cast<long long>(unix_now());
  const std::string base = (std::filesystem::path(logdir) /
                            str("events.out.tfevents.", secs, ".", host, ".", ::getpid(), ".qforge"))
                               .string();
  // "x": exclusive create, so two writers started in the same second never truncate each other.
  for (int attempt = 0; attempt < 1000 && !file_; ++attempt) {
    path_ = attempt == 0 ? base : str(base, ".", attempt);
    file_ = std::fopen(path_.c_str(), "wbx");
    if (!file_ && errno != EEXIST) break;
  }
  if (!file_)
    throw InputError(str("cannot create TensorBoard event file '", path_, "': ", std::strerror(errno)));

  std::string ev = event_header(0);
  put_bytes(ev, 3, "brain.Event:2");
  try {
    write_record(ev);
    flush();  // make the file recognisable to TensorBoard immediately
  } catch (...) {
    std::fclose(file_);
    throw;
  }
}

TensorBoardWriter::~TensorBoardWriter() {
  if (file_) std::fclose(file_);  // fclose flushes
}

void TensorBoardWriter::write_record(const std::string& data) {
  std::string rec;
  rec.reserve(data.size() + 16);
  put_le(rec, data.size(), 8);
  put_le(rec, masked_crc32c(rec.data(), 8), 4);
  rec += data;
  put_le(rec, masked_crc32c(data.data(), data.size()), 4);
  if (std::fwrite(rec.data(), 1, rec.size(), file_) != rec.size())
    throw InputError(str("cannot write TensorBoard event file '", path_, "': ", std::strerror(errno)));
}

void TensorBoardWriter::add_scalar(const std::string& tag, double value, int64_t step) {
  std::string val;  // Summary.Value { tag = 1 (string), simple_value = 2 (float) }
  put_bytes(val, 1, tag);
  put_float(val, 2, static_cast<float>(value));
  std::string summary;  // Summary { repeated Value value = 1 }
  put_bytes(summary, 1, val);
  std::string ev = event_header(step);
  put_bytes(ev, 5, summary);
  write_record(ev);
}

void TensorBoardWriter::flush() {
  if (std::fflush(file_) != 0)
    throw InputError(str("cannot flush TensorBoard event file '", path_, "': ", std::strerror(errno)));
}

}  // namespace qf::core
