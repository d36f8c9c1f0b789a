#include "core/safetensors.h"

#include <ATen/ATen.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors_header.h"

namespace qf::st {
at::ScalarType scalar_type(DType d) {
  switch (d) {
    case DType::F64: return at::kDouble;
    case DType::F32: return at::kFloat;
    case DType::F16: return at::kHalf;
    case DType::BF16: return at::kBFloat16;
    case DType::I64: return at::kLong;
    case DType::I32: return at::kInt;
    case DType::I16: return at::kShort;
    case DType::I8: return at::kChar;
    case DType::U8: return at::kByte;
    case DType::BOOL: return at::kBool;
    case DType::F8_E4M3: return at::kFloat8_e4m3fn;
    case DType::F8_E5M2: return at::kFloat8_e5m2;
    case DType::U16: return at::kUInt16;
    case DType::U32: return at::kUInt32;
    case DType::U64: return at::kUInt64;
  }
  throw Error("safetensors: unmapped dtype");
}

namespace {
// A read-only file mapping shared by the tensors that view it (MAP_PRIVATE: writes stay private).
// Live mappings, so drop_pages() only ever advises memory that is a file mapping (MADV_DONTNEED on
// heap memory would zero it).
std::mutex g_maps_mu;
std::vector<std::pair<uintptr_t, size_t>> g_maps;

// A file truncated (or rewritten shorter) by another process while mapped turns every later touch of
// the lost pages into SIGBUS, which would kill the process without a word. Each live mapping has a
// slot here, readable from a signal handler (fixed storage, atomics, no locks): its address range and
// the message to print, formatted when it was mapped. The handler prints it and exits 1; a SIGBUS
// anywhere else goes to the action that was installed before.
constexpr size_t kSlots = 1024, kMsg = 1024;
struct SigbusSlot {
  std::atomic<uintptr_t> begin{0};
  std::atomic<size_t> len{0};  // 0: free (set last when claiming, first when releasing)
  size_t msg_len = 0;
  char msg[kMsg];
};
SigbusSlot g_slots[kSlots];  // claimed and released under g_maps_mu
struct sigaction g_old_sigbus {};

void on_sigbus(int sig, siginfo_t* si, void* /*ctx*/) {
  const auto a = reinterpret_cast<uintptr_t>(si->si_addr);
  for (auto& s : g_slots) {
    const size_t n = s.len.load(std::memory_order_acquire);
    const uintptr_t b = s.begin.load(std::memory_order_relaxed);
    if (n == 0 || a < b || a - b >= n) continue;
    for (size_t done = 0; done < s.msg_len;) {
      const ssize_t w = ::write(STDERR_FILENO, s.msg + done, s.msg_len - done);
      if (w > 0) done += static_cast<size_t>(w);
      else if (errno != EINTR) break;
    }
    ::_exit(1);
  }
  // Not ours: hand it back. A fault re-executes the access on return and faults again under the old
  // action; a sent signal is sent again (blocked here, delivered on return).
  const int saved = errno;
  ::sigaction(sig, &g_old_sigbus, nullptr);
  if (si->si_code <= 0) ::raise(sig);
  errno = saved;
}

void install_sigbus_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGBUS, &sa, &g_old_sigbus);
  });
}

// Claims a slot for [addr, addr + len) mapped from `path` (none free: the mapping works, a truncation
// just goes unexplained). Returns the slot index or -1. Caller holds g_maps_mu.
int claim_slot(uintptr_t addr, size_t len, const std::string& path) {
  for (size_t i = 0; i < kSlots; ++i) {
    auto& s = g_slots[i];
    if (s.len.load(std::memory_order_relaxed) != 0) continue;
    const char* head = "qforge: error: ";
    const char* tail =
        " changed or was truncated while mapped (SIGBUS reading it); the model read from it is no longer valid. "
        "Restore the file and rerun (a training run resumes from its last checkpoint).\n";
    std::string p = path;
    const size_t room = kMsg - std::strlen(head) - std::strlen(tail) - 1;
    if (p.size() > room) p = "..." + p.substr(p.size() - (room - 3));  // keep the file name end
    const std::string m = head + p + tail;
    std::memcpy(s.msg, m.data(), m.size());
    s.msg_len = m.size();
    s.begin.store(addr, std::memory_order_relaxed);
    s.len.store(len, std::memory_order_release);
    return static_cast<int>(i);
  }
  return -1;
}

struct Mapping {
  void* addr = nullptr;
  size_t len = 0;
  int slot = -1;
  void track(const std::string& path) {
    install_sigbus_handler();
    std::lock_guard<std::mutex> l(g_maps_mu);
    g_maps.emplace_back(reinterpret_cast<uintptr_t>(addr), len);
    slot = claim_slot(reinterpret_cast<uintptr_t>(addr), len, path);
  }
  ~Mapping() {
    if (!addr || addr == MAP_FAILED) return;
    {
      std::lock_guard<std::mutex> l(g_maps_mu);
      if (slot >= 0) g_slots[slot].len.store(0, std::memory_order_release);
      for (size_t i = 0; i < g_maps.size(); ++i)
        if (g_maps[i].first == reinterpret_cast<uintptr_t>(addr)) {
          g_maps.erase(g_maps.begin() + static_cast<std::ptrdiff_t>(i));
          break;
        }
    }
    ::munmap(addr, len);
  }
};
}  // namespace

bool drop_pages(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0 || !t.device().is_cpu()) return false;
  const auto b = reinterpret_cast<uintptr_t>(t.data_ptr());
  const auto e = b + static_cast<uintptr_t>(t.numel() * t.element_size());
  {
    std::lock_guard<std::mutex> l(g_maps_mu);
    bool inside = false;
    for (auto& [a, n] : g_maps) inside |= b >= a && e <= a + n;
    if (!inside) return false;
  }
  const long page = ::sysconf(_SC_PAGESIZE);
  const uintptr_t pb = (b + page - 1) / page * page, pe = e / page * page;
  if (pe > pb) ::madvise(reinterpret_cast<void*>(pb), pe - pb, MADV_DONTNEED);
  return true;
}

std::string dtype_name(at::ScalarType t) {
  for (auto& d : dtypes())
    if (scalar_type(d.dtype) == t) return d.name;
  throw Error(str("safetensors: unsupported dtype ", c10::toString(t)));
}

namespace {

// The 8-byte length and padded JSON header for `tensors` (sizes only: no tensor data is touched).
std::string header_bytes(const std::vector<std::pair<std::string, at::Tensor>>& tensors, const Metadata& meta) {
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  if (!meta.empty()) h["__metadata__"] = meta;
  size_t off = 0;
  for (auto& [name, t] : tensors) {
    QF_CHECK(t.defined(), "safetensors: tensor '", name, "' is undefined");
    const size_t nb = static_cast<size_t>(t.numel()) * t.element_size();
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    h[name] = {{"dtype", dtype_name(t.scalar_type())}, {"shape", shape}, {"data_offsets", {off, off + nb}}};
    off += nb;
  }
  std::string header = h.dump();
  while ((8 + header.size()) % 8) header.push_back(' ');
  std::string out;
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  return out + header;
}

// Each tensor's bytes in order, one CPU-contiguous copy at a time (none for a CPU-contiguous tensor).
template <typename Sink>
void for_each_data(const std::vector<std::pair<std::string, at::Tensor>>& tensors, Sink&& sink) {
  for (auto& [name, t] : tensors) {
    auto c = t.detach().to(at::kCPU).contiguous();
    sink(std::string_view(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.numel()) * c.element_size()));
  }
}

}  // namespace

std::string serialize(const std::vector<std::pair<std::string, at::Tensor>>& tensors, const Metadata& meta) {
  std::string out = header_bytes(tensors, meta);
  for_each_data(tensors, [&](std::string_view b) { out.append(b); });
  return out;
}

void save(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors, const Metadata& meta) {
  // Streamed into the temp file tensor by tensor: saving never holds a second copy of the model
  // (an 8B QLoRA checkpoint is 5.9 GB of NF4 base and bf16 embeddings).
  fs::AtomicWriter w(path);
  w.write(header_bytes(tensors, meta));
  for_each_data(tensors, [&](std::string_view b) { w.write(b); });
  w.commit();
}

at::Tensor File::get(const std::string& name) const {
  for (auto& [n, t] : tensors)
    if (n == name) return t;
  throw InputError(str("safetensors: no tensor named '", name, "'"));
}
bool File::has(const std::string& name) const {
  for (auto& [n, t] : tensors)
    if (n == name) return true;
  return false;
}

namespace {
// The whole file mapped MAP_PRIVATE (copy-on-write); mapping reads nothing until pages are touched.
std::shared_ptr<Mapping> map_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw InputError(str("cannot open safetensors file '", path, "': ", std::strerror(errno)));
  struct stat sb {};
  if (::fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
    ::close(fd);
    throw InputError(str("'", path, "' is not a regular file"));
  }
  auto map = std::make_shared<Mapping>();
  map->len = static_cast<size_t>(sb.st_size);
  if (map->len > 0) map->addr = ::mmap(nullptr, map->len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map->addr == MAP_FAILED) throw InputError(str("cannot map safetensors file '", path, "': ", std::strerror(errno)));
  if (map->len > 0) map->track(path);
  return map;
}

const uint8_t* base_of(const Mapping& m) {
  static const uint8_t kEmpty[1] = {0};
  return m.len ? static_cast<const uint8_t*>(m.addr) : kEmpty;
}
}  // namespace

Header read_header(const std::string& path) {
  auto map = map_file(path);
  return parse_header(base_of(*map), map->len, path);  // touches the header's pages only
}

File load(const std::string& path, bool populate) {
  // Memory-mapped: tensors view the mapping (copy-on-write), so loading holds no second copy.
  auto map = map_file(path);
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
  // Map the (page-cached) file read-only up front in one call instead of one page fault per 4 KiB
  // later; writes still copy-on-write. Best effort: kernels before 5.14 ignore it.
  if (map->len > 0 && populate) ::madvise(map->addr, map->len, MADV_POPULATE_READ);
  const auto* base = base_of(*map);
  Header h = parse_header(base, map->len, path);
  File f;
  f.metadata = h.metadata;
  for (auto& e : h.entries) {
    auto type = scalar_type(e.dtype);
    auto* p = const_cast<uint8_t*>(base) + h.data_start + e.begin;
    at::Tensor t;
    if (e.end == e.begin || reinterpret_cast<uintptr_t>(p) % info(e.dtype).size != 0) {
      t = at::empty(e.shape, at::TensorOptions().dtype(type));  // empty or misaligned: copy
      if (e.end > e.begin) std::memcpy(t.data_ptr(), p, e.end - e.begin);
    } else {
      t = at::from_blob(p, e.shape, [map](void*) {}, at::TensorOptions().dtype(type));
    }
    f.tensors.emplace_back(e.name, t);
  }
  return f;
}

}  // namespace qf::st
