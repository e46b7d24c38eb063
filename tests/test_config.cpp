// Config: defaults, default.toml, errors for bad type / range / unknown key /
// missing file, --set overrides, printing round trip.
#include <boost/test/unit_test.hpp>

#include <filesystem>
#include <fstream>

#include "config/config.hpp"

using namespace undertone::config;

namespace {
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const config_error& e) {
    return e.what();
  }
  return "<no error>";
}
std::string default_toml_path() { return std::string(UT_SOURCE_DIR) + "/config/default.toml"; }
}  // namespace

BOOST_AUTO_TEST_CASE(defaults_are_valid) { BOOST_CHECK_NO_THROW(validate(undertone_config{})); }

BOOST_AUTO_TEST_CASE(default_toml_documents_every_key_with_the_builtin_defaults) {
  auto from_file = load_file(default_toml_path());
  // Same effective values as the built-in defaults.
  BOOST_CHECK_EQUAL(to_toml(from_file), to_toml(undertone_config{}));
  // Every key appears literally in the file, preceded by a comment line.
  std::ifstream in(default_toml_path());
  std::stringstream ss;
  ss << in.rdbuf();
  std::string text = ss.str();
  for (const auto& k : known_keys()) {
    std::string key = k.substr(k.find('.') + 1);
    auto pos = text.find("\n" + key + " = ");
    BOOST_TEST_INFO("key " << k);
    BOOST_REQUIRE(pos != std::string::npos);
    auto prev_line_start = text.rfind('\n', pos - 1);
    BOOST_TEST_INFO("key " << k << " needs a comment line above it");
    BOOST_CHECK(text.compare(prev_line_start + 1, 1, "#") == 0);
  }
}

BOOST_AUTO_TEST_CASE(good_file_overrides_defaults) {
  auto cfg = load_string("[encoder]\nchunk_ms = 640\n[llm]\ndtype = \"bf16\"\n[store]\nenabled = false\n");
  BOOST_CHECK_EQUAL(cfg.encoder.chunk_ms, 640);
  BOOST_CHECK_EQUAL(cfg.llm.dtype, "bf16");
  BOOST_CHECK_EQUAL(cfg.store.enabled, false);
  BOOST_CHECK_EQUAL(cfg.sampling.max_tokens, undertone_config{}.sampling.max_tokens);
}

BOOST_AUTO_TEST_CASE(out_of_range_names_key_value_and_range) {
  BOOST_CHECK_EQUAL(error_of([] { load_string("[encoder]\nchunk_ms = 0\n"); }),
                    "encoder.chunk_ms must be in [80, 2000], got 0");
  BOOST_CHECK_EQUAL(error_of([] { load_string("[sampling]\ntop_p = 1.5\n"); }),
                    "sampling.top_p must be in [0, 1], got 1.5");
}

BOOST_AUTO_TEST_CASE(bad_type_is_an_error) {
  BOOST_CHECK_EQUAL(error_of([] { load_string("[encoder]\nchunk_ms = \"320\"\n"); }),
                    "encoder.chunk_ms must be an integer, got \"320\"");
  BOOST_CHECK_EQUAL(error_of([] { load_string("[store]\nenabled = 1\n"); }),
                    "store.enabled must be a boolean (true/false), got 1");
}

BOOST_AUTO_TEST_CASE(bad_enum_lists_choices) {
  BOOST_CHECK_EQUAL(error_of([] { load_string("[llm]\ndtype = \"int4\"\n"); }),
                    "llm.dtype must be one of auto, fp32, bf16, fp16, got \"int4\"");
  BOOST_CHECK_EQUAL(error_of([] { load_string("[llm]\ndevice = \"gpu0\"\n"); }),
                    "llm.device must be one of cpu, cuda, cuda:N, got \"gpu0\"");
}

BOOST_AUTO_TEST_CASE(unknown_key_and_section_are_errors_with_suggestion) {
  BOOST_CHECK_EQUAL(error_of([] { load_string("[encoder]\nchunk_m = 320\n", "x.toml"); }),
                    "x.toml: unknown key encoder.chunk_m (did you mean encoder.chunk_ms?)");
  auto e = error_of([] { load_string("[encodr]\nchunk_ms = 320\n", "x.toml"); });
  BOOST_CHECK(e.rfind("x.toml: unknown section [encodr]", 0) == 0);
}

BOOST_AUTO_TEST_CASE(syntax_error_has_line) {
  auto e = error_of([] { load_string("[llm]\ndtype = \n", "y.toml"); });
  BOOST_CHECK(e.rfind("y.toml:2:", 0) == 0);
}

BOOST_AUTO_TEST_CASE(missing_file_is_an_error) {
  BOOST_CHECK_EQUAL(error_of([] { load_file("/nonexistent/undertone.toml"); }),
                    "cannot open config file /nonexistent/undertone.toml");
}

BOOST_AUTO_TEST_CASE(overrides_parse_by_key_type) {
  undertone_config cfg;
  apply_override(cfg, "encoder.chunk_ms=160");
  apply_override(cfg, "llm.model=/tmp/x.gguf");
  apply_override(cfg, "sampling.temperature=0.7");
  apply_override(cfg, "store.enabled=false");
  BOOST_CHECK_EQUAL(cfg.encoder.chunk_ms, 160);
  BOOST_CHECK_EQUAL(cfg.llm.model, "/tmp/x.gguf");
  BOOST_CHECK_CLOSE(cfg.sampling.temperature, 0.7, 1e-9);
  BOOST_CHECK_EQUAL(cfg.store.enabled, false);
  BOOST_CHECK_EQUAL(error_of([&] { apply_override(cfg, "encoder.chunk_ms=abc"); }),
                    "encoder.chunk_ms must be an integer, got 'abc'");
  BOOST_CHECK_EQUAL(error_of([&] { apply_override(cfg, "encoder.chunk_ms=5"); }),
                    "encoder.chunk_ms must be in [80, 2000], got 5");
  BOOST_CHECK_EQUAL(error_of([&] { apply_override(cfg, "nodot=1"); }),
                    "override 'nodot=1' must look like section.key=value");
}

BOOST_AUTO_TEST_CASE(cross_field_rule) {
  BOOST_CHECK_EQUAL(error_of([] { load_string("[llm]\ncontext_tokens = 4096\nkv_cells = 1024\n"); }),
                    "llm.kv_cells must be >= llm.context_tokens (4096), got 1024");
}

BOOST_AUTO_TEST_CASE(printed_config_round_trips) {
  undertone_config cfg;
  apply_override(cfg, "vad.threshold_db=-35.5");
  apply_override(cfg, "server.bind=ipc:///tmp/ut.sock");
  auto again = load_string(to_toml(cfg));
  BOOST_CHECK_EQUAL(to_toml(again), to_toml(cfg));
  BOOST_CHECK_EQUAL(again.server.bind, "ipc:///tmp/ut.sock");
}

BOOST_AUTO_TEST_CASE(model_home_resolution) {
  undertone_config cfg;
  cfg.general.model_home = "/some/where";
  BOOST_CHECK_EQUAL(resolve_model_home(cfg), "/some/where");
  cfg.general.model_home.clear();
  setenv("UNDERTONE_HOME", "/env/home", 1);
  BOOST_CHECK_EQUAL(resolve_model_home(cfg), "/env/home");
}
