#include "data/calibration.h"

#include <ATen/ATen.h>

#include "core/error.h"

namespace qf::data {

at::Tensor calibration_tokens(const data::PackedSet& set, int64_t samples, const std::string& origin) {
  if (set.size() < samples) {
    throw ConfigError({str("quant.calib.samples: ", samples, " calibration sequences were requested but ", origin,
                           " yields only ", set.size(), " sequences of ", set.size() ? set.tokens.size(1) - 1 : 0,
                           " tokens; lower quant.calib.samples (qforge quantize --samples) or give more text")});
  }
  auto idx = at::div(at::arange(samples, at::kLong) * set.size(), samples, "floor");
  auto rows = set.tokens.index_select(0, idx.to(set.tokens.device()));
  return rows.slice(1, 0, rows.size(1) - 1).contiguous();
}

}  // namespace qf::data
