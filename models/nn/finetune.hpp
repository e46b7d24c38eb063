// Torch building blocks of the online fine-tuner (models/finetune.hpp has the
// torch-free API and finetune_round()); exposed for tests.
#pragma once

#include <cstdint>
#include <vector>

#include "models/nn/alignment.hpp"

namespace undertone::models {

/// The training pool of a round: `steps` batches of `batch` examples, each with
/// exactly `k` replay examples and batch - k session examples (each stream
/// cycling through its examples in a seeded shuffled order), laid out so that
/// alignment_trainer (stage emotion, seed `seed`) draws them in exactly that
/// order: its data_sampler visits the pool once, and slot perm[j] of the
/// sampler's first permutation holds draw j. `session` must not be empty, nor
/// `replay` when k > 0.
std::vector<alignment_example> mixed_pool(const std::vector<alignment_example>& session,
                                          const std::vector<alignment_example>& replay, int64_t steps, int64_t batch,
                                          int64_t k, uint64_t seed);

}  // namespace undertone::models
