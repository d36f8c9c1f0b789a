// A GGUF file as the export tests read it back: opened and validated (every tensor's type known to
// qforge's ggml tables), and one tensor's stored bytes as a uint8 tensor (empty, with a test failure,
// when the file has no such tensor).
#pragma once
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>

#include "core/gguf_file.h"
#include "quant/ggml_more.h"

namespace qf::testing {

inline std::shared_ptr<gguf_in::File> open_gguf(const std::string& path) {
  auto f = gguf_in::File::open(path);
  f->check_tensors([](uint32_t id) { return quant::ggml::gguf_type_geometry(id); });
  return f;
}

inline at::Tensor gguf_tensor_bytes(const gguf_in::File& f, const std::string& name) {
  const auto* t = f.tensor(name);
  EXPECT_NE(t, nullptr) << name;
  if (!t) return at::empty({0}, at::kByte);
  auto out = at::empty({static_cast<int64_t>(t->nbytes)}, at::kByte);
  std::memcpy(out.data_ptr<uint8_t>(), f.data(*t), t->nbytes);
  return out;
}

}  // namespace qf::testing
