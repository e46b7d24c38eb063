// GGUF reader: metadata and dequantization against gguf-py's golden values
// (tests/golden/make_gguf_golden.py), and defensive parsing of damaged files.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "models/gguf.hpp"
#include "support.hpp"

namespace fs = std::filesystem;
using namespace undertone;
using models::gguf_error;
using models::gguf_file;

namespace {
const nlohmann::json& golden() {
  static nlohmann::json j = testing::read_golden_json("gguf_golden.json");
  return j;
}
std::vector<uint8_t> from_hex(const std::string& h) {
  std::vector<uint8_t> out(h.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) out[i] = uint8_t(std::stoi(h.substr(2 * i, 2), nullptr, 16));
  return out;
}
}  // namespace

BOOST_AUTO_TEST_CASE(metadata_matches_reference) {
  gguf_file g(testing::llm_gguf_path());
  const auto& md = golden()["metadata"];
  BOOST_CHECK_EQUAL(g.version(), 3u);
  BOOST_CHECK_EQUAL(g.get_string("general.architecture"), md["general.architecture"].get<std::string>());
  for (const char* k : {"llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                        "llama.attention.head_count", "llama.attention.head_count_kv", "llama.context_length",
                        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"}) {
    BOOST_TEST_INFO(k);
    BOOST_CHECK_EQUAL(g.get_int(k), md[k].get<int64_t>());
  }
  BOOST_CHECK_CLOSE(g.get_float("llama.rope.freq_base"), md["llama.rope.freq_base"].get<double>(), 1e-9);
  BOOST_CHECK_EQUAL(g.get_string("tokenizer.ggml.model"), "gpt2");
  BOOST_CHECK_EQUAL(g.tensors().size(), golden()["tensor_count"].get<size_t>());
  BOOST_CHECK_EQUAL(g.get_strings("tokenizer.ggml.tokens").size(), golden()["n_tokens"].get<size_t>());
  BOOST_CHECK_EQUAL(g.get_strings("tokenizer.ggml.merges").size(), golden()["n_merges"].get<size_t>());
  BOOST_CHECK_THROW(g.get_string("llama.block_count"), gguf_error);  // wrong type
  BOOST_CHECK_THROW(g.get_int("no.such.key"), gguf_error);
  BOOST_CHECK_EQUAL(g.get_int_or("no.such.key", 7), 7);
}

BOOST_AUTO_TEST_CASE(real_tensors_dequantize_like_reference) {
  gguf_file g(testing::llm_gguf_path());
  for (const auto& t : golden()["tensors"]) {
    const auto* info = g.find_tensor(t["name"].get<std::string>());
    BOOST_REQUIRE(info);
    BOOST_CHECK_EQUAL(models::ggml_type_name(info->type), t["type"].get<std::string>());
    std::vector<float> x(size_t(info->n_elements()));
    g.dequantize(*info, x.data());
    double sum = 0, abs_sum = 0;
    for (float v : x) sum += v, abs_sum += std::fabs(v);
    BOOST_TEST_INFO(info->name);
    BOOST_CHECK_CLOSE(abs_sum, t["abs_sum"].get<double>(), 1e-6);
    BOOST_CHECK_SMALL(sum - t["sum"].get<double>(), 1e-6 * abs_sum);
    const auto& idx = t["index"];
    const auto& vals = t["values"];
    for (size_t i = 0; i < idx.size(); ++i)
      BOOST_CHECK_EQUAL(x[idx[i].get<size_t>()], vals[i].get<float>());  // bit-exact: same arithmetic
  }
}

BOOST_AUTO_TEST_CASE(every_block_type_dequantizes_like_reference) {
  for (const auto& b : golden()["blocks"]) {
    auto raw = from_hex(b["hex"].get<std::string>());
    int64_t n = b["n"].get<int64_t>();
    uint32_t type = b["ggml_type"].get<uint32_t>();
    BOOST_REQUIRE_EQUAL(models::ggml_row_bytes(type, n), raw.size());
    std::vector<float> x(static_cast<size_t>(n));
    models::dequantize_row(type, raw.data(), x.data(), n);
    const auto& want = b["values"];
    int bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      float w = want[size_t(i)].get<float>();
      if (std::fabs(x[size_t(i)] - w) > 1e-6f * std::max(1.f, std::fabs(w))) ++bad;
    }
    BOOST_TEST_INFO(b["type"].get<std::string>());
    BOOST_CHECK_EQUAL(bad, 0);
  }
}

BOOST_AUTO_TEST_CASE(unsupported_type_is_a_clear_error) {
  std::vector<uint8_t> raw(292, 0);
  float out[256];
  try {
    models::dequantize_row(uint32_t(models::ggml_type::q8_k), raw.data(), out, 256);
    BOOST_FAIL("expected an error");
  } catch (const gguf_error& e) {
    BOOST_CHECK_EQUAL(std::string(e.what()), "unsupported ggml type q8_k");
  }
}

BOOST_AUTO_TEST_CASE(truncated_files_are_errors_not_crashes) {
  testing::temp_dir t;
  std::string cut = (t.path / "cut.gguf").string();
  const size_t full = fs::file_size(testing::llm_gguf_path());
  // Cuts inside the magic, the metadata, the tensor table and the tensor data.
  for (size_t n : {size_t(0), size_t(3), size_t(23), size_t(100), size_t(5000), size_t(1000000), size_t(2000000),
                   full - 1}) {
    testing::copy_prefix(testing::llm_gguf_path(), cut, n);
    BOOST_TEST_INFO("prefix of " << n << " bytes");
    BOOST_CHECK_THROW(gguf_file{cut}, gguf_error);
  }
  BOOST_CHECK_THROW(gguf_file{(t.path / "absent.gguf").string()}, gguf_error);
}

BOOST_AUTO_TEST_CASE(corrupted_headers_are_errors_not_crashes) {
  // Random byte damage in the header region: every outcome must be either a
  // successful parse or a gguf_error (run under ASan/valgrind to see reads).
  testing::temp_dir t;
  std::string head = (t.path / "head.gguf").string();
  std::mt19937 rng(7);
  const size_t header_bytes = 1800000;  // metadata (vocab, merges) + tensor table
  int errors = 0;
  for (int trial = 0; trial < 40; ++trial) {
    fs::copy_file(testing::llm_gguf_path(), head, fs::copy_options::overwrite_existing);
    for (int k = 0; k < 4; ++k) testing::corrupt_byte(head, rng() % (trial < 20 ? 64 : header_bytes));
    try {
      gguf_file g(head);
    } catch (const gguf_error&) {
      ++errors;
    }
  }
  BOOST_CHECK_GT(errors, 0);
}

BOOST_AUTO_TEST_CASE(fp16_conversion_edge_cases) {
  BOOST_CHECK_EQUAL(models::fp16_to_fp32(0x3C00), 1.0f);
  BOOST_CHECK_EQUAL(models::fp16_to_fp32(0xC000), -2.0f);
  BOOST_CHECK_EQUAL(models::fp16_to_fp32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  BOOST_CHECK(std::isinf(models::fp16_to_fp32(0x7C00)));
  BOOST_CHECK(std::isnan(models::fp16_to_fp32(0x7E00)));
  BOOST_CHECK_EQUAL(models::bf16_to_fp32(0x3F80), 1.0f);
}
