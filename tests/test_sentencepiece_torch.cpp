// Regression: SentencePiece models load and encode inside a process that also
// runs LibTorch. Linking libsentencepiece directly next to LibTorch's libprotobuf
// crashed at start-up; models/sp_shim keeps them apart.
#include <boost/test/unit_test.hpp>

#include <torch/types.h>

#include "models/runtime.hpp"
#include "models/tokenizer.hpp"
#include "support.hpp"

using namespace undertone;

BOOST_AUTO_TEST_CASE(sentencepiece_and_torch_in_one_process) {
  auto t = torch::arange(10, torch::kFloat32);
  BOOST_CHECK_EQUAL(t.sum().item<float>(), 45.0f);
  auto tok = models::tokenizer::from_sentencepiece(testing::source_dir() + "/tests/golden/tokenizer_sp_tiny.model");
  BOOST_CHECK_EQUAL(tok->type_name(), "sentencepiece");
  BOOST_CHECK_EQUAL(tok->vocab_size(), 1000);
  auto ids = tok->encode("the speaker sounds happy", false);
  BOOST_CHECK(!ids.empty());
  BOOST_CHECK_EQUAL(tok->decode(ids).find("sounds happy") != std::string::npos, true);
  BOOST_CHECK(!models::torch_version().empty());
}

BOOST_AUTO_TEST_CASE(missing_model_file_is_a_clear_error) {
  BOOST_CHECK_THROW(models::tokenizer::from_sentencepiece("/nonexistent/tokenizer.model"), models::tokenizer_error);
}
