#include "models/nn/kv_cache.hpp"

#include <algorithm>
#include <stdexcept>

namespace undertone::models {

kv_cache::kv_cache(const llama_hparams& hp, int64_t n_cells, torch::Device device, torch::Dtype dtype)
    : device_(device), dtype_(dtype), n_layer_(hp.n_layer) {
  if (n_cells <= 0) throw std::invalid_argument("kv_cache: n_cells must be > 0 (llm.kv_cells)");
  if (hp.n_layer <= 0 || hp.n_head_kv <= 0 || hp.head_dim <= 0)
    throw std::invalid_argument("kv_cache: hyper-parameters not set: " + hp.to_string());
  c10::InferenceMode guard;
  const auto opts = torch::TensorOptions().device(device).dtype(dtype);
  for (int64_t l = 0; l < hp.n_layer; ++l) {
    // Zero-filled so that never-written cells can't hold NaN/Inf bit patterns
    // (a masked score is -inf, but 0 * NaN in P@V would still poison a row).
    k_.push_back(torch::zeros({hp.n_head_kv, n_cells, hp.head_dim}, opts));
    v_.push_back(torch::zeros({hp.n_head_kv, n_cells, hp.head_dim}, opts));
  }
  cell_seq_.assign(size_t(n_cells), -1);
  cell_pos_.assign(size_t(n_cells), -1);
}

int64_t kv_cache::used(int32_t seq) const {
  int64_t n = 0;
  for (int64_t c = 0; c < extent_; ++c) n += cell_seq_[size_t(c)] == seq;
  return n;
}

int64_t kv_cache::seq_pos_max(int32_t seq) const {
  int64_t m = -1;
  for (int64_t c = 0; c < extent_; ++c)
    if (cell_seq_[size_t(c)] == seq) m = std::max(m, cell_pos_[size_t(c)]);
  return m;
}

std::vector<int32_t> kv_cache::sequences() const {
  std::vector<int32_t> s;
  for (int64_t c = 0; c < extent_; ++c)
    if (cell_seq_[size_t(c)] >= 0) s.push_back(cell_seq_[size_t(c)]);
  std::sort(s.begin(), s.end());
  s.erase(std::unique(s.begin(), s.end()), s.end());
  return s;
}

void kv_cache::free_cell(int64_t c) {
  if (cell_seq_[size_t(c)] < 0) return;
  cell_seq_[size_t(c)] = -1;
  cell_pos_[size_t(c)] = -1;
  --n_used_;
  search_from_ = std::min(search_from_, c);
}

void kv_cache::update_extent() {
  while (extent_ > 0 && cell_seq_[size_t(extent_ - 1)] < 0) --extent_;
}

void kv_cache::truncate(int32_t seq, int64_t n_tokens) {
  for (int64_t c = 0; c < extent_; ++c)
    if (cell_seq_[size_t(c)] == seq && cell_pos_[size_t(c)] >= n_tokens) free_cell(c);
  update_extent();
}

void kv_cache::remove(int32_t seq) { truncate(seq, -1); }

void kv_cache::clear() {
  std::fill(cell_seq_.begin(), cell_seq_.end(), -1);
  std::fill(cell_pos_.begin(), cell_pos_.end(), -1);
  n_used_ = extent_ = search_from_ = 0;
}

std::vector<int64_t> kv_cache::allocate(const std::vector<int32_t>& seq, const std::vector<int64_t>& pos) {
  if (seq.size() != pos.size()) throw std::invalid_argument("kv_cache::allocate: seq/pos size mismatch");
  const int64_t n = int64_t(seq.size());
  if (n_used_ + n > capacity())
    throw std::runtime_error("KV cache full: " + std::to_string(n_used_) + " cells in use of " +
                             std::to_string(capacity()) + ", " + std::to_string(n) +
                             " more needed; raise llm.kv_cells");
  std::vector<int64_t> cells;
  cells.reserve(size_t(n));
  int64_t c = search_from_;
  for (int64_t i = 0; i < n; ++i) {
    while (cell_seq_[size_t(c)] >= 0) ++c;  // guaranteed to find one (checked above)
    cell_seq_[size_t(c)] = seq[size_t(i)];
    cell_pos_[size_t(c)] = pos[size_t(i)];
    cells.push_back(c);
    extent_ = std::max(extent_, c + 1);
    ++c;
  }
  n_used_ += n;
  search_from_ = c;
  return cells;
}

void kv_cache::release(const std::vector<int64_t>& cells) {
  for (int64_t c : cells) free_cell(c);
  update_extent();
}

void kv_cache::copy(int32_t src, int32_t dst, int64_t n_tokens) {
  if (src == dst) return;
  if (src < 0 || dst < 0) throw std::invalid_argument("kv_cache::copy: sequence ids must be >= 0");
  remove(dst);
  std::vector<int64_t> from;
  std::vector<int32_t> seqs;
  std::vector<int64_t> pos;
  for (int64_t c = 0; c < extent_; ++c)
    if (cell_seq_[size_t(c)] == src && (n_tokens < 0 || cell_pos_[size_t(c)] < n_tokens)) {
      from.push_back(c);
      seqs.push_back(dst);
      pos.push_back(cell_pos_[size_t(c)]);
    }
  if (from.empty()) return;
  const std::vector<int64_t> to = allocate(seqs, pos);
  c10::InferenceMode guard;
  const auto idx_opts = torch::TensorOptions().dtype(torch::kLong);
  const torch::Tensor from_t = torch::tensor(from, idx_opts).to(device_);
  const torch::Tensor to_t = torch::tensor(to, idx_opts).to(device_);
  for (int64_t l = 0; l < n_layer_; ++l) {
    k_[size_t(l)].index_copy_(1, to_t, k_[size_t(l)].index_select(1, from_t));
    v_[size_t(l)].index_copy_(1, to_t, v_[size_t(l)].index_select(1, from_t));
  }
}

}  // namespace undertone::models
