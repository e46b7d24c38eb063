// Tokenizer tests against independent references (tests/golden/make_tokenizer_golden.py):
// llama.cpp on the pinned SmolLM2 GGUF, HF tokenizers on Whisper's tokenizer.json and
// on synthetic tokenizer.json files, python sentencepiece on a tiny trained model.
// Token ids must be identical on every corpus string (no tolerance: tokenization is
// discrete).
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "models/gguf.hpp"
#include "models/tokenizer.hpp"
#include "tests/support.hpp"

using namespace undertone::models;
using json = nlohmann::json;
namespace ut = undertone::testing;

namespace {

const json& golden() {
  static const json j = ut::read_golden_json("tokenizer_golden.json");
  return j;
}

std::vector<std::string> corpus() { return golden()["corpus"].get<std::vector<std::string>>(); }

const gguf_file& smol_gguf() {
  static gguf_file f(ut::llm_gguf_path());
  return f;
}

const tokenizer& smol() {
  static auto t = tokenizer::from_gguf(smol_gguf());
  return *t;
}

std::string show(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '\n') o += "\\n";
    else if (c == '\t') o += "\\t";
    else if (c == '\r') o += "\\r";
    else o += c;
  }
  return o;
}

std::string show(const std::vector<int32_t>& v) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < v.size(); ++i) o << (i ? "," : "") << v[i];
  o << "]";
  return o.str();
}

// Encodes every corpus string and compares with the reference ids; reports mismatches.
void check_ids(const tokenizer& t, const json& expected, bool parse_special, const std::string& label) {
  const auto c = corpus();
  BOOST_REQUIRE_EQUAL(expected.size(), c.size());
  size_t bad = 0;
  for (size_t i = 0; i < c.size(); ++i) {
    const auto want = expected[i].get<std::vector<int32_t>>();
    const auto got = t.encode(c[i], parse_special);
    if (got != want) {
      if (++bad <= 5) {
        BOOST_TEST_MESSAGE(label << " mismatch on #" << i << " '" << show(c[i]) << "'\n  want " << show(want)
                                 << "\n  got  " << show(got));
      }
    }
  }
  BOOST_TEST_MESSAGE(label << ": " << (c.size() - bad) << "/" << c.size() << " identical");
  BOOST_CHECK_MESSAGE(bad == 0, label << ": " << bad << " of " << c.size() << " strings differ");
}

// The token_stream_decoder must emit valid UTF-8 at every step and add up to `want`.
void check_stream(const tokenizer& t, const std::vector<int32_t>& ids, const std::string& want,
                  const std::string& label) {
  token_stream_decoder d(t);
  std::string all;
  for (int32_t id : ids) {
    const std::string part = d.push(id);
    BOOST_REQUIRE_MESSAGE(utf8_valid(part), label << ": streamed invalid UTF-8");
    all += part;
  }
  const std::string tail = d.flush();
  BOOST_REQUIRE(utf8_valid(tail));
  all += tail;
  BOOST_CHECK_MESSAGE(all == want, label << ": streamed '" << show(all) << "' != '" << show(want) << "'");
}

std::vector<uint8_t> from_hex(const std::string& h) {
  std::vector<uint8_t> out;
  for (size_t i = 0; i + 1 < h.size(); i += 2) out.push_back(uint8_t(std::stoi(h.substr(i, 2), nullptr, 16)));
  return out;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(gguf_bpe)

BOOST_AUTO_TEST_CASE(smollm_ids_with_special_tokens_match_llama_cpp) {
  BOOST_CHECK_EQUAL(smol().type_name(), "bpe");
  check_ids(smol(), golden()["smollm_gguf"]["special"], true, "smollm parse_special");
}

BOOST_AUTO_TEST_CASE(smollm_ids_without_special_tokens_match_llama_cpp) {
  check_ids(smol(), golden()["smollm_gguf"]["plain"], false, "smollm plain");
}

BOOST_AUTO_TEST_CASE(other_pre_tokenizers_match_llama_cpp) {
  for (const auto& [pre, ids] : golden()["gguf_pre_variants"].items()) {
    auto t = tokenizer::from_gguf(smol_gguf(), pre);
    check_ids(*t, ids, true, "gguf pre=" + pre);
  }
}

BOOST_AUTO_TEST_CASE(decode_matches_llama_cpp_and_round_trips) {
  const auto c = corpus();
  const json& g = golden()["smollm_gguf"];
  for (size_t i = 0; i < c.size(); ++i) {
    const auto ids = g["special"][i].get<std::vector<int32_t>>();
    BOOST_CHECK_EQUAL(smol().decode(ids), g["decode"][i].get<std::string>());
    BOOST_CHECK_MESSAGE(smol().decode(smol().encode(c[i], false)) == c[i], "round trip #" << i);
    BOOST_CHECK_MESSAGE(smol().decode(smol().encode(c[i], true)) == c[i], "round trip (special) #" << i);
  }
}

BOOST_AUTO_TEST_CASE(special_ids_and_stop_set_match_llama_cpp) {
  const json& g = golden()["smollm_gguf"];
  BOOST_CHECK_EQUAL(smol().vocab_size(), g["n_vocab"].get<int32_t>());
  BOOST_CHECK_EQUAL(smol().bos_id(), g["bos"].get<int32_t>());
  BOOST_CHECK_EQUAL(smol().eos_id(), g["eos"].get<int32_t>());
  const auto eog = g["eog"].get<std::vector<int32_t>>();
  BOOST_CHECK_EQUAL(show(smol().stop_ids()), show(eog));
  for (int32_t id : eog) BOOST_CHECK(smol().is_stop(id));
  BOOST_CHECK(!smol().is_stop(1));
  BOOST_CHECK(!smol().add_bos());
  BOOST_CHECK_EQUAL(*smol().token_id("<|im_end|>"), 2);
  BOOST_CHECK(smol().kind(2) == token_kind::control);
  BOOST_CHECK_EQUAL(smol().token_bytes(2), "<|im_end|>");
  BOOST_CHECK(!smol().token_id("no such piece").has_value());
  // Byte-level pieces: "Ġ" is the space byte.
  const auto sp = smol().token_id("\xC4\xA0");
  BOOST_REQUIRE(sp.has_value());
  BOOST_CHECK_EQUAL(smol().token_bytes(*sp), " ");
  BOOST_CHECK_EQUAL(smol().chat_template_text().find("<|im_start|>") != std::string::npos, true);
}

BOOST_AUTO_TEST_CASE(bad_ids_and_invalid_utf8) {
  BOOST_CHECK_THROW(smol().token_bytes(-1), tokenizer_error);
  BOOST_CHECK_THROW(smol().decode({smol().vocab_size()}), tokenizer_error);
  // Invalid UTF-8 is replaced by U+FFFD before tokenizing, as llama.cpp does.
  const std::string bad = "ab\xFF\xC3(cd\xE2\x82";
  BOOST_CHECK(smol().encode(bad, false) == smol().encode(utf8_sanitize(bad), false));
  BOOST_CHECK_EQUAL(smol().decode(smol().encode(bad, false)), utf8_sanitize(bad));
  BOOST_CHECK(smol().encode("", true).empty());
}

BOOST_AUTO_TEST_CASE(random_token_bytes_match_llama_cpp_and_python_replacement) {
  for (const auto& r : golden()["random_decode"]) {
    const auto ids = r["ids"].get<std::vector<int32_t>>();
    const auto want = from_hex(r["bytes_hex"].get<std::string>());
    const std::string got = smol().decode(ids);
    BOOST_CHECK(std::vector<uint8_t>(got.begin(), got.end()) == want);
    const std::string replaced = r["replaced"].get<std::string>();
    BOOST_CHECK_EQUAL(utf8_sanitize(got), replaced);
    check_stream(smol(), ids, replaced, "random " + show(ids));
  }
}

BOOST_AUTO_TEST_CASE(streaming_decoder_equals_decode) {
  for (const auto& s : corpus()) {
    const auto ids = smol().encode(s, true);
    check_stream(smol(), ids, smol().decode(ids), "stream '" + show(s) + "'");
  }
  // A 4-byte emoji spread over several tokens is held back until complete.
  const std::string emoji = "\xF0\x9F\xA6\x9C";  // U+1F99C
  const auto ids = smol().encode(emoji, false);
  BOOST_REQUIRE_GT(ids.size(), 1u);
  BOOST_REQUIRE_LT(smol().token_bytes(ids[0]).size(), 4u);
  token_stream_decoder d(smol());
  BOOST_CHECK_EQUAL(d.push(ids[0]), "");
  BOOST_CHECK_GT(d.pending_bytes(), 0u);
  std::string out;
  for (size_t i = 1; i < ids.size(); ++i) out += d.push(ids[i]);
  BOOST_CHECK_EQUAL(out, emoji);
  BOOST_CHECK_EQUAL(d.flush(), "");
  // An unfinished character at the end of the stream becomes U+FFFD.
  BOOST_CHECK_EQUAL(d.push(ids[0]), "");
  BOOST_CHECK_EQUAL(d.flush(), "\xEF\xBF\xBD");
}

BOOST_AUTO_TEST_CASE(long_runs_round_trip) {
  // One pre-tokenizer word of 200k bytes (merge heap), long whitespace runs
  // (lookahead backtracking in the regex), and many emoji.
  std::string emoji;
  for (int i = 0; i < 20000; ++i) emoji += "\xF0\x9F\x98\x80";
  for (const std::string& s : {std::string(200000, 'a'), std::string(100000, ' ') + "x", std::string(50000, '\n'),
                               emoji, std::string(30000, '7')}) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto ids = smol().encode(s, false);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    BOOST_CHECK(smol().decode(ids) == s);
    BOOST_TEST_MESSAGE(s.size() << " bytes -> " << ids.size() << " tokens in " << dt << " s");
  }
}

BOOST_AUTO_TEST_CASE(encode_throughput_report) {
  // Not an assertion: prints encode speed on the corpus (numbers for the report).
  const auto c = corpus();
  size_t bytes = 0;
  for (const auto& s : c) bytes += s.size();
  auto fresh = tokenizer::from_gguf(smol_gguf());
  auto seconds = [](auto t0) { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  size_t n = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (const auto& s : c) n += fresh->encode(s, true).size();
  const double cold = seconds(t0);
  const int reps = 20;
  t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r)
    for (const auto& s : c) n += fresh->encode(s, true).size();
  const double warm = seconds(t0) / reps;
  std::string joined;
  for (const auto& s : c) joined += s + "\n";
  std::string big;
  for (int r = 0; r < 8; ++r) big += joined;
  auto fresh2 = tokenizer::from_gguf(smol_gguf());
  t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < 5; ++r) n += fresh2->encode(big, true).size();
  const double whole = seconds(t0) / 5;
  BOOST_TEST_MESSAGE("encode throughput: per string, cold cache " << bytes / cold / 1e6 << " MB/s, warm "
                                                                  << bytes / warm / 1e6 << " MB/s; one " << big.size()
                                                                  << "-byte text " << big.size() / whole / 1e6 << " MB/s");
  BOOST_CHECK(n > 0);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(hf_tokenizer_json)

const tokenizer& whisper() {
  static auto t = tokenizer::from_tokenizer_json(ut::whisper_ct2_dir() + "/tokenizer.json");
  return *t;
}

BOOST_AUTO_TEST_CASE(whisper_ids_match_hf_tokenizers) {
  check_ids(whisper(), golden()["whisper_json"]["special"], true, "whisper added tokens");
  check_ids(whisper(), golden()["whisper_json"]["plain"], false, "whisper encode_special_tokens");
}

BOOST_AUTO_TEST_CASE(whisper_decode_matches_hf_tokenizers) {
  const auto c = corpus();
  const json& g = golden()["whisper_json"];
  for (size_t i = 0; i < c.size(); ++i) {
    const auto ids = g["special"][i].get<std::vector<int32_t>>();
    BOOST_CHECK_EQUAL(whisper().decode(ids), g["decode"][i].get<std::string>());
    BOOST_CHECK_MESSAGE(whisper().decode(whisper().encode(c[i], false)) == c[i], "round trip #" << i);
  }
  BOOST_CHECK_EQUAL(whisper().eos_id(), 50256);
  BOOST_CHECK(whisper().is_stop(50256));
}

// Same construction as synthetic_tokenizer_json() in make_tokenizer_golden.py.
json build_synthetic_json(const json& spec) {
  const auto& toks = smol_gguf().get_strings("tokenizer.ggml.tokens");
  const auto types = smol_gguf().get_ints("tokenizer.ggml.token_type");
  const auto& merges = smol_gguf().get_strings("tokenizer.ggml.merges");
  json vocab = json::object(), added = json::array(), ms = json::array();
  for (size_t i = 0; i < toks.size(); ++i) {
    vocab[toks[i]] = i;
    if (types[i] == 3) {
      added.push_back({{"id", i}, {"content", toks[i]}, {"single_word", false}, {"lstrip", false},
                       {"rstrip", false}, {"normalized", false}, {"special", true}});
    }
  }
  const bool pairs = spec["pair_merges"].get<bool>();
  for (const auto& m : merges) {
    if (pairs) {
      const size_t sp = m.find(' ');
      ms.push_back(json::array({m.substr(0, sp), m.substr(sp + 1)}));
    } else {
      ms.push_back(m);
    }
  }
  return {{"version", "1.0"},
          {"added_tokens", added},
          {"normalizer", nullptr},
          {"pre_tokenizer", spec["pre_tokenizer"]},
          {"post_processor", nullptr},
          {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}}},
          {"model",
           {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
            {"ignore_merges", spec["ignore_merges"]}, {"vocab", vocab}, {"merges", ms}}}};
}

BOOST_AUTO_TEST_CASE(synthetic_pre_tokenizers_match_hf_tokenizers) {
  ut::temp_dir dir;
  for (const auto& [name, spec] : golden()["synthetic_json"].items()) {
    const std::string path = dir.str() + "/" + name + ".json";
    std::ofstream(path) << build_synthetic_json(spec).dump();
    auto t = tokenizer::from_tokenizer_json(path);
    check_ids(*t, spec["ids"], true, "synthetic " + name);
  }
}

BOOST_AUTO_TEST_CASE(hf_dir_reads_configs) {
  ut::temp_dir dir;
  {
    std::ifstream in(ut::whisper_ct2_dir() + "/tokenizer.json", std::ios::binary);
    std::ofstream out(dir.str() + "/tokenizer.json", std::ios::binary);
    out << in.rdbuf();
  }
  std::ofstream(dir.str() + "/tokenizer_config.json")
      << json{{"eos_token", {{"content", "<|startoftranscript|>"}}},
              {"bos_token", nullptr},
              {"chat_template", "{{ '<|im_start|>' }}"}}
             .dump();
  std::ofstream(dir.str() + "/generation_config.json") << json{{"eos_token_id", {50256, 50362}}}.dump();
  auto t = tokenizer::from_hf_dir(dir.str());
  BOOST_CHECK_EQUAL(t->type_name(), "bpe");
  BOOST_CHECK_EQUAL(t->eos_id(), *t->token_id("<|startoftranscript|>"));
  BOOST_CHECK_EQUAL(t->bos_id(), -1);
  BOOST_CHECK(t->is_stop(t->eos_id()));
  BOOST_CHECK(t->is_stop(50362));
  BOOST_CHECK(t->is_stop(50256));
  BOOST_CHECK_EQUAL(t->chat_template_text(), "{{ '<|im_start|>' }}");
  BOOST_CHECK_THROW(tokenizer::from_hf_dir(dir.str() + "/missing"), tokenizer_error);
}

BOOST_AUTO_TEST_CASE(malformed_tokenizer_json_is_an_error) {
  ut::temp_dir dir;
  std::ofstream(dir.str() + "/a.json") << "{\"model\": {\"type\": \"BPE\"";
  BOOST_CHECK_THROW(tokenizer::from_tokenizer_json(dir.str() + "/a.json"), tokenizer_error);
  std::ofstream(dir.str() + "/b.json") << R"({"model": {"type": "WordPiece", "vocab": {}}})";
  BOOST_CHECK_THROW(tokenizer::from_tokenizer_json(dir.str() + "/b.json"), tokenizer_error);
  std::ofstream(dir.str() + "/c.json")
      << R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": {"type": "Whitespace"},
             "decoder": {"type": "ByteLevel"}})";
  BOOST_CHECK_THROW(tokenizer::from_tokenizer_json(dir.str() + "/c.json"), tokenizer_error);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(sentencepiece)

const tokenizer& tiny_sp() {
  static auto t = tokenizer::from_sentencepiece(ut::source_dir() + "/tests/golden/tokenizer_sp_tiny.model");
  return *t;
}

BOOST_AUTO_TEST_CASE(ids_match_python_sentencepiece) {
  const json& g = golden()["sentencepiece"];
  BOOST_CHECK_EQUAL(tiny_sp().type_name(), "sentencepiece");
  BOOST_CHECK_EQUAL(tiny_sp().vocab_size(), g["vocab_size"].get<int32_t>());
  BOOST_CHECK_EQUAL(tiny_sp().bos_id(), g["bos"].get<int32_t>());
  BOOST_CHECK_EQUAL(tiny_sp().eos_id(), g["eos"].get<int32_t>());
  BOOST_CHECK(tiny_sp().is_stop(tiny_sp().eos_id()));
  check_ids(tiny_sp(), g["ids"], false, "sentencepiece");
}

BOOST_AUTO_TEST_CASE(decode_and_stream_match_python_sentencepiece) {
  const auto c = corpus();
  const json& g = golden()["sentencepiece"];
  for (size_t i = 0; i < c.size(); ++i) {
    const auto ids = g["ids"][i].get<std::vector<int32_t>>();
    const std::string want = g["decode"][i].get<std::string>();
    BOOST_CHECK_EQUAL(tiny_sp().decode(ids), want);
    check_stream(tiny_sp(), ids, want, "sp stream #" + std::to_string(i));
  }
}

BOOST_AUTO_TEST_CASE(control_tokens_parsed_only_when_asked) {
  const auto with = tiny_sp().encode("hi</s>there", true);
  const auto without = tiny_sp().encode("hi</s>there", false);
  BOOST_CHECK(std::find(with.begin(), with.end(), tiny_sp().eos_id()) != with.end());
  BOOST_CHECK(std::find(without.begin(), without.end(), tiny_sp().eos_id()) == without.end());
  BOOST_CHECK_EQUAL(tiny_sp().decode(without), "hi</s>there");
}

BOOST_AUTO_TEST_CASE(hf_dir_with_tokenizer_model_only) {
  ut::temp_dir dir;
  {
    std::ifstream in(ut::source_dir() + "/tests/golden/tokenizer_sp_tiny.model", std::ios::binary);
    std::ofstream out(dir.str() + "/tokenizer.model", std::ios::binary);
    out << in.rdbuf();
  }
  auto t = tokenizer::from_hf_dir(dir.str());
  BOOST_CHECK_EQUAL(t->type_name(), "sentencepiece");
  BOOST_CHECK(t->add_bos());
  BOOST_CHECK_THROW(tokenizer::from_sentencepiece(dir.str() + "/nope.model"), tokenizer_error);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(utf8)

BOOST_AUTO_TEST_CASE(sanitize_and_validate) {
  BOOST_CHECK(utf8_valid("plain ascii"));
  BOOST_CHECK(utf8_valid("\xE2\x82\xAC \xF0\x9F\x98\x80"));
  BOOST_CHECK(!utf8_valid("\xC0\xAF"));          // overlong
  BOOST_CHECK(!utf8_valid("\xED\xA0\x80"));      // surrogate
  BOOST_CHECK(!utf8_valid("\xF4\x90\x80\x80"));  // > U+10FFFF
  BOOST_CHECK(!utf8_valid("\xE2\x82"));          // truncated
  BOOST_CHECK_EQUAL(utf8_sanitize("a\xE2\x82" "b"), "a\xEF\xBF\xBD" "b");
  BOOST_CHECK_EQUAL(utf8_sanitize("\xF0\x9F\x98"), "\xEF\xBF\xBD");
  BOOST_CHECK_EQUAL(utf8_sanitize("\x80\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD");
}

BOOST_AUTO_TEST_SUITE_END()
