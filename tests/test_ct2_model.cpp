// CTranslate2 reader on the pinned Whisper tiny.en, and damaged files.
#include <boost/test/unit_test.hpp>

#include <filesystem>
#include <map>

#include "models/ct2_model.hpp"
#include "models/model_info.hpp"
#include "support.hpp"

namespace fs = std::filesystem;
using namespace undertone;

BOOST_AUTO_TEST_CASE(whisper_tiny_en_layout) {
  models::ct2_model m(testing::whisper_ct2_dir());
  BOOST_CHECK_EQUAL(m.spec_name(), "WhisperSpec");
  BOOST_CHECK_EQUAL(m.binary_version(), 6u);
  const auto& pe = m.at("encoder/position_encodings/encodings");
  BOOST_CHECK_EQUAL(pe.shape.size(), 2u);
  BOOST_CHECK_EQUAL(pe.shape[0], 1500);
  BOOST_CHECK_EQUAL(pe.shape[1], 384);
  BOOST_CHECK_EQUAL(m.scalar_int("encoder/num_heads"), 6);
  const auto& conv = m.at("encoder/conv1/weight");
  BOOST_CHECK_EQUAL(conv.shape[0], 384);
  BOOST_CHECK_EQUAL(conv.shape[1], 80);  // mel bins
  BOOST_CHECK_EQUAL(conv.shape[2], 3);
  // Alias resolves to the tied embedding.
  BOOST_CHECK_EQUAL(m.find("decoder/projection/weight"), m.find("decoder/embeddings/weight"));
  BOOST_CHECK_EQUAL(m.at("decoder/embeddings/weight").shape[0], 51864);
  BOOST_CHECK(m.config().contains("suppress_ids"));
  // Sinusoidal table: row 0 is sin(0)=0 for the first half, cos(0)=1 for the second.
  auto v = m.to_float(pe);
  BOOST_CHECK_EQUAL(v[0], 0.0f);
  BOOST_CHECK_EQUAL(v[383], 1.0f);
  BOOST_CHECK_THROW(m.at("encoder/no_such"), models::ct2_error);
}

BOOST_AUTO_TEST_CASE(summary_reports_architecture) {
  auto s = models::summarize_ct2_whisper(testing::whisper_ct2_dir());
  std::map<std::string, std::string> facts(s.facts.begin(), s.facts.end());
  BOOST_CHECK_EQUAL(facts["encoder layers"], "4");
  BOOST_CHECK_EQUAL(facts["decoder layers"], "4");
  BOOST_CHECK_EQUAL(facts["width (d_model)"], "384");
  BOOST_CHECK_EQUAL(facts["mel bins"], "80");
  BOOST_CHECK_EQUAL(facts["vocabulary"], "51864 tokens");
  BOOST_CHECK(s.to_string().find("WhisperSpec") != std::string::npos);
  BOOST_CHECK_GT(s.parameters, 30000000);
}

BOOST_AUTO_TEST_CASE(truncated_model_bin_is_an_error) {
  testing::temp_dir t;
  for (size_t n : {size_t(0), size_t(2), size_t(30), size_t(200), size_t(40000000)}) {
    testing::copy_prefix(testing::whisper_ct2_dir() + "/model.bin", (t.path / "model.bin").string(), n);
    BOOST_TEST_INFO("prefix " << n);
    BOOST_CHECK_THROW(models::ct2_model{t.str()}, models::ct2_error);
  }
  BOOST_CHECK_THROW(models::ct2_model{(t.path / "nothing").string()}, models::ct2_error);
}
