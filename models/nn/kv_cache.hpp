// Unified KV cache of a llama-family decoder (as llama.cpp's): a fixed number of
// cells per layer shared by all sequences; every used cell is tagged with the
// (sequence id, position) of the token whose keys/values it holds.
//
// Per-sequence operations: append (implicit in llama_model::step), truncate
// (barge-in), remove, copy (prompt-prefix reuse). Not thread-safe: one caller
// (the LLM worker) owns a cache and the steps that use it.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "models/nn/llm_checkpoint.hpp"

namespace undertone::models {

class kv_cache {
 public:
  /// Allocates `n_cells` cells (tokens, summed over all sequences) for every
  /// layer of a model with hyper-parameters `hp`, on `device` in `dtype`.
  /// Memory: 2 * n_layer * n_cells * n_head_kv * head_dim * sizeof(dtype).
  kv_cache(const llama_hparams& hp, int64_t n_cells, torch::Device device = torch::kCPU,
           torch::Dtype dtype = torch::kFloat32);

  /// Total cells (tokens).
  int64_t capacity() const { return int64_t(cell_seq_.size()); }
  /// Cells in use, all sequences.
  int64_t used() const { return n_used_; }
  /// Cells in use by sequence `seq` (its token count when positions are 0..n-1).
  int64_t used(int32_t seq) const;
  /// Largest position stored for `seq`, or -1 if it has none.
  int64_t seq_pos_max(int32_t seq) const;
  /// Ids of the sequences that have at least one cell, ascending.
  std::vector<int32_t> sequences() const;

  /// Keeps only the cells of `seq` with position < n_tokens (barge-in: drop
  /// what was generated after the cut).
  void truncate(int32_t seq, int64_t n_tokens);
  /// Frees all cells of `seq`.
  void remove(int32_t seq);
  /// Replaces the cells of `dst` with a copy of the cells of `src` whose
  /// position is < n_tokens (all of them if n_tokens < 0). Copies keys and
  /// values physically (each sequence owns its cells); throws if the cache
  /// cannot hold the copy.
  void copy(int32_t src, int32_t dst, int64_t n_tokens = -1);
  /// Frees every cell.
  void clear();

  // ---- used by llama_model::step ----
  torch::Device device() const { return device_; }
  torch::Dtype dtype() const { return dtype_; }
  int64_t n_layer() const { return n_layer_; }
  /// Keys / values of `layer`: [n_head_kv, n_cells, head_dim].
  torch::Tensor& k(int64_t layer) { return k_[size_t(layer)]; }
  torch::Tensor& v(int64_t layer) { return v_[size_t(layer)]; }
  /// Sequence id per cell (-1 = free) and position per cell.
  const std::vector<int32_t>& cell_seq() const { return cell_seq_; }
  const std::vector<int64_t>& cell_pos() const { return cell_pos_; }
  /// 1 + index of the highest used cell (cells beyond are all free).
  int64_t extent() const { return extent_; }
  /// Reserves one free cell per row, tagged (seq[i], pos[i]); returns their
  /// indices. Throws (changing nothing) if there are fewer free cells than rows:
  /// "KV cache full: N cells in use of M; raise llm.kv_cells".
  std::vector<int64_t> allocate(const std::vector<int32_t>& seq, const std::vector<int64_t>& pos);
  /// Frees the given cells (undoes allocate after a failed step).
  void release(const std::vector<int64_t>& cells);

 private:
  void free_cell(int64_t c);
  void update_extent();

  torch::Device device_;
  torch::Dtype dtype_;
  int64_t n_layer_ = 0;
  std::vector<torch::Tensor> k_, v_;
  std::vector<int32_t> cell_seq_;
  std::vector<int64_t> cell_pos_;
  int64_t n_used_ = 0;
  int64_t extent_ = 0;
  int64_t search_from_ = 0;  ///< lowest index that may be free
};

}  // namespace undertone::models
