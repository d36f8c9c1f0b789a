// PTQ calibration sets drawn from a packed dataset (GPTQ / AWQ / RTN's statistics).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "data/dataset.h"

namespace qf::data {

// `samples` sequences evenly spaced over `set`, input ids [samples, seq_len]. Throws ConfigError
// naming quant.calib.samples when `set` (from `origin`) is smaller.
at::Tensor calibration_tokens(const PackedSet& set, int64_t samples, const std::string& origin);

}  // namespace qf::data
