// Sampler: deterministic order, per-epoch permutations, resume mid-epoch, rank sharding.
#include "data/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "core/error.h"

using qf::data::Sampler;

namespace {

std::vector<std::vector<int64_t>> take(Sampler& s, int n) {
  std::vector<std::vector<int64_t>> out;
  for (int i = 0; i < n; ++i) out.push_back(s.next());
  return out;
}

}  // namespace

TEST(Sampler, BatchesPerEpochDropsPartialGlobalBatch) {
  EXPECT_EQ(Sampler(10, 3, 1).batches_per_epoch(), 3);
  EXPECT_EQ(Sampler(10, 2, 1, true, 0, 2).batches_per_epoch(), 2);
  EXPECT_EQ(Sampler(12, 2, 1, true, 1, 3).batches_per_epoch(), 2);
}

TEST(Sampler, TooFewItemsIsAConfigErrorNamingBatchSize) {
  try {
    Sampler s(10, 4, 1, true, 0, 3);
    FAIL() << "expected ConfigError";
  } catch (const qf::ConfigError& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("trainer.batch_size"), std::string::npos) << m;
    EXPECT_NE(m.find("10"), std::string::npos) << m;
    EXPECT_NE(m.find("world size 3"), std::string::npos) << m;
  }
  EXPECT_THROW(Sampler(10, 0, 1), qf::ConfigError);
  EXPECT_THROW(Sampler(10, 1, 1, true, 2, 2), qf::Error);
}

TEST(Sampler, EachEpochIsAPermutationAndEpochsDiffer) {
  Sampler s(24, 4, 7);
  ASSERT_EQ(s.batches_per_epoch(), 6);
  std::vector<int64_t> e0, e1;
  for (auto& b : take(s, 6)) e0.insert(e0.end(), b.begin(), b.end());
  EXPECT_EQ(s.state().epoch, 0);
  for (auto& b : take(s, 6)) e1.insert(e1.end(), b.begin(), b.end());
  EXPECT_EQ(s.state().epoch, 1);
  std::vector<int64_t> all(24);
  for (int i = 0; i < 24; ++i) all[i] = i;
  auto s0 = e0, s1 = e1;
  std::sort(s0.begin(), s0.end());
  std::sort(s1.begin(), s1.end());
  EXPECT_EQ(s0, all);
  EXPECT_EQ(s1, all);
  EXPECT_NE(e0, all) << "epoch 0 should be shuffled";
  EXPECT_NE(e0, e1) << "epochs should use different permutations";
}

TEST(Sampler, NoShuffleIsInOrder) {
  Sampler s(10, 3, 99, /*shuffle=*/false);
  EXPECT_EQ(s.next(), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(s.next(), (std::vector<int64_t>{3, 4, 5}));
  EXPECT_EQ(s.next(), (std::vector<int64_t>{6, 7, 8}));
  EXPECT_EQ(s.next(), (std::vector<int64_t>{0, 1, 2}));  // item 9 dropped; next epoch
  EXPECT_EQ(s.state().epoch, 1);
}

TEST(Sampler, SameSeedSameBatchesDifferentSeedDifferent) {
  Sampler a(100, 8, 1234), b(100, 8, 1234), c(100, 8, 1235);
  auto ba = take(a, 30), bb = take(b, 30), bc = take(c, 30);
  EXPECT_EQ(ba, bb);
  EXPECT_NE(ba, bc);
}

TEST(Sampler, ResumeContinuesIdenticallyMidEpochAndAcrossEpochs) {
  for (int k : {0, 3, 5, 12, 13}) {
    Sampler a(50, 4, 42, true, 1, 2);  // 6 batches per epoch
    take(a, k);
    Sampler::State st = a.state();
    auto expect = take(a, 15);
    Sampler b(50, 4, 42, true, 1, 2);
    b.set_state(st);
    EXPECT_EQ(take(b, 15), expect) << "resumed after " << k << " batches";
  }
}

TEST(Sampler, SetStateRejectsOutOfRangeCursor) {
  Sampler s(20, 4, 1);
  EXPECT_THROW(s.set_state({0, 6}), qf::Error);
  EXPECT_THROW(s.set_state({-1, 0}), qf::Error);
  EXPECT_NO_THROW(s.set_state({3, 5}));  // cursor == batches_per_epoch: next() rolls over
  s.next();
  EXPECT_EQ(s.state().epoch, 4);
  EXPECT_EQ(s.state().cursor, 1);
}

TEST(Sampler, RankShardsAreDisjointAndUnionIsTheSingleRankBatch) {
  const int world = 3;
  const int64_t n = 47, bs = 2;
  Sampler whole(n, bs * world, 5, true, 0, 1);
  std::vector<Sampler> ranks;
  for (int r = 0; r < world; ++r) ranks.emplace_back(n, bs, 5, true, r, world);
  ASSERT_EQ(whole.batches_per_epoch(), ranks[0].batches_per_epoch());
  for (int step = 0; step < 3 * whole.batches_per_epoch(); ++step) {
    auto g = whole.next();
    std::vector<int64_t> cat;
    std::set<int64_t> seen;
    for (auto& r : ranks) {
      auto b = r.next();
      ASSERT_EQ(static_cast<int64_t>(b.size()), bs);
      for (auto i : b) EXPECT_TRUE(seen.insert(i).second) << "index " << i << " on two ranks at step " << step;
      cat.insert(cat.end(), b.begin(), b.end());
    }
    EXPECT_EQ(cat, g) << "step " << step;
  }
}
