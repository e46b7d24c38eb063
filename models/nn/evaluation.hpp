// The torch building blocks of `undertone eval` (models/evaluation.hpp has the
// torch-free API and run_evaluation()); exposed for tests and other tools.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "models/nn/alignment.hpp"
#include "models/nn/projector.hpp"

namespace undertone::models {

/// Result of fit_linear_probe().
struct linear_probe_fit {
  std::vector<int> predictions;  ///< class of every test row
  double train_accuracy = 0;     ///< on the (standardized) training rows
};

/// Multinomial logistic regression (softmax over `n_classes`, weights and bias,
/// mean cross-entropy + l2 * ||W||^2 / 2, bias not penalized) on features
/// standardized with the training rows' mean and standard deviation, fitted
/// full-batch with LBFGS (strong Wolfe line search, at most `iterations`), in
/// float64 on the CPU. x_train [N, D], y_train N labels in [0, n_classes),
/// x_test [M, D] -> M predictions. Deterministic (zero initialization).
linear_probe_fit fit_linear_probe(const torch::Tensor& x_train, const std::vector<int>& y_train,
                                  const torch::Tensor& x_test, int n_classes, double l2 = 1e-3,
                                  int64_t iterations = 300);

/// Teacher-forced mean log-probability per scored token: for each row, the
/// prefix embeddings [P_i, d_model] are followed by `continuations[i]`, whose
/// last `scored[i]` tokens are scored; `batch` rows per forward. No autograd.
std::vector<double> mean_continuation_logprob(const alignment_llm& llm, const std::vector<torch::Tensor>& prefixes,
                                              const std::vector<std::vector<int32_t>>& continuations,
                                              const std::vector<int64_t>& scored, int64_t batch = 8);

/// Mean over positions of the LLM's final (normed) hidden states of each token
/// sequence fed on its own (no chat template): [n, d_model] float32 CPU; a zero
/// row for an empty sequence. `batch` sequences per forward. No autograd.
torch::Tensor pooled_hidden_states(const alignment_llm& llm, const std::vector<std::vector<int32_t>>& seqs,
                                   int64_t batch = 8);

/// A projector from a projector checkpoint (projector.safetensors), a trainer
/// checkpoint (trainables.safetensors; projector tensors only - one that also
/// tuned encoder layers is refused, since evaluation uses the frozen encoder's
/// cached outputs) or a training run directory (its projector.safetensors, else
/// the checkpoint named by its `latest`). `resolved` receives the file read.
/// Throws std::runtime_error naming the path.
std::shared_ptr<projector> load_projector_any(const std::string& path, torch::Device device,
                                              std::string* resolved = nullptr);

}  // namespace undertone::models
