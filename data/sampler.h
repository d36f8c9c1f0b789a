// Deterministic, resumable, rank-sharded sampler over packed sequences. Invariant: the sequence
// of batches depends only on (n, batch_size, seed, rank, world) and the state (epoch, cursor),
// so restoring the state continues the identical order mid-epoch.
#pragma once
#include <cstdint>
#include <vector>

namespace qf::data {

class Sampler {
 public:
  // n items; each call to next() returns batch_size indices for this rank. With shuffle, each epoch
  // is a permutation drawn from (seed, epoch) with a portable PRNG (std::mt19937_64 + own Fisher-Yates,
  // not std::shuffle, whose algorithm is implementation-defined). The epoch's permutation is cut into
  // global batches of batch_size*world; rank r takes the r-th slice of each; the last partial global
  // batch is dropped.
  Sampler(int64_t n, int64_t batch_size, uint64_t seed, bool shuffle = true, int rank = 0, int world = 1);
  std::vector<int64_t> next();  // advances; rolls over to the next epoch automatically
  int64_t batches_per_epoch() const;
  struct State {
    int64_t epoch = 0;
    int64_t cursor = 0;  // global batches consumed in this epoch
  };
  State state() const { return state_; }
  void set_state(State s);

 private:
  void build_epoch();
  int64_t n_, bs_;
  uint64_t seed_;
  bool shuffle_;
  int rank_, world_;
  State state_;
  std::vector<int64_t> perm_;
  int64_t perm_epoch_ = -1;
};

}  // namespace qf::data
