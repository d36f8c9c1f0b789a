// Deterministic, resumable, rank-sharded sampler (see sampler.h for the invariant).
#include "data/sampler.h"

#include <random>
#include <utility>

#include "core/error.h"

namespace qf::data {

Sampler::Sampler(int64_t n, int64_t batch_size, uint64_t seed, bool shuffle, int rank, int world)
    : n_(n), bs_(batch_size), seed_(seed), shuffle_(shuffle), rank_(rank), world_(world) {
  QF_CHECK(n_ >= 0, "Sampler: number of items must be >= 0, got ", n_);
  QF_CHECK(world_ >= 1 && rank_ >= 0 && rank_ < world_, "Sampler: rank ", rank_, " is invalid for world size ", world_);
  if (bs_ < 1) throw ConfigError({str("trainer.batch_size: must be >= 1, got ", bs_)});
  if (batches_per_epoch() < 1)
    throw ConfigError({str("trainer.batch_size: ", bs_, " x world size ", world_, " = ", bs_ * world_,
                           " sequences per global batch, but the dataset has only ", n_,
                           " sequences; lower trainer.batch_size or data.seq_len, or add data")});
}

int64_t Sampler::batches_per_epoch() const { return n_ / (bs_ * static_cast<int64_t>(world_)); }

void Sampler::set_state(State s) {
  QF_CHECK(s.epoch >= 0 && s.cursor >= 0 && s.cursor <= batches_per_epoch(), "Sampler: invalid state (epoch ",
           s.epoch, ", cursor ", s.cursor, "); expected epoch >= 0 and cursor in [0, ", batches_per_epoch(), "]");
  state_ = s;
}

void Sampler::build_epoch() {
  perm_.resize(static_cast<size_t>(n_));
  for (int64_t i = 0; i < n_; ++i) perm_[static_cast<size_t>(i)] = i;
  if (shuffle_ && n_ > 1) {
    std::mt19937_64 rng(seed_ ^ (static_cast<uint64_t>(state_.epoch) * 0x9E3779B97F4A7C15ULL));
    for (int64_t i = n_ - 1; i > 0; --i) {
      int64_t j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
      std::swap(perm_[static_cast<size_t>(i)], perm_[static_cast<size_t>(j)]);
    }
  }
  perm_epoch_ = state_.epoch;
}

std::vector<int64_t> Sampler::next() {
  if (state_.cursor >= batches_per_epoch()) {
    state_.epoch += 1;
    state_.cursor = 0;
  }
  if (perm_epoch_ != state_.epoch) build_epoch();
  int64_t start = state_.cursor * bs_ * world_ + static_cast<int64_t>(rank_) * bs_;
  std::vector<int64_t> out(perm_.begin() + start, perm_.begin() + start + bs_);
  state_.cursor += 1;
  return out;
}

}  // namespace qf::data
