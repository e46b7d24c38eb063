// The undertone binary as a user meets it: --help, --version, config check/show
// with errors and exit codes, overrides.
#include <boost/test/unit_test.hpp>

#include <sys/wait.h>

#include <cstdio>
#include <fstream>

#include "support.hpp"

namespace {
struct result {
  int code;
  std::string out;
};
result run(const std::string& args) {
  std::string cmd = std::string(UT_UNDERTONE_BIN) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  int st = pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, out};
}
bool has(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }
}  // namespace

BOOST_AUTO_TEST_CASE(help_lists_subcommands_and_global_options) {
  auto r = run("--help");
  BOOST_CHECK_EQUAL(r.code, 0);
  for (const char* w : {"run", "config", "models", "--config", "--set", "--log-level", "--version"}) {
    BOOST_TEST_INFO(w);
    BOOST_CHECK(has(r.out, w));
  }
  auto sub = run("config --help");
  BOOST_CHECK_EQUAL(sub.code, 0);
  BOOST_CHECK(has(sub.out, "check") && has(sub.out, "show"));
}

BOOST_AUTO_TEST_CASE(version_names_components) {
  auto r = run("--version");
  BOOST_CHECK_EQUAL(r.code, 0);
  BOOST_CHECK(has(r.out, "undertone") && has(r.out, "CAF") && has(r.out, "ZeroMQ") && has(r.out, "LibTorch"));
}

BOOST_AUTO_TEST_CASE(config_check_good_and_bad_files) {
  auto ok = run("config check " + undertone::testing::source_dir() + "/config/default.toml");
  BOOST_CHECK_EQUAL(ok.code, 0);
  BOOST_CHECK(has(ok.out, ": ok"));

  undertone::testing::temp_dir t;
  std::string bad = (t.path / "bad.toml").string();
  std::ofstream(bad) << "[encoder]\nchunk_ms = 0\n";
  auto r = run("config check " + bad);
  BOOST_CHECK_EQUAL(r.code, 2);
  BOOST_CHECK(has(r.out, "encoder.chunk_ms must be in [80, 2000], got 0"));

  std::ofstream(bad) << "[vad]\nend_silense_ms = 500\n";
  r = run("config check " + bad);
  BOOST_CHECK_EQUAL(r.code, 2);
  BOOST_CHECK(has(r.out, "did you mean vad.end_silence_ms?"));

  r = run("config check " + (t.path / "missing.toml").string());
  BOOST_CHECK_EQUAL(r.code, 2);
  BOOST_CHECK(has(r.out, "cannot open config file"));
}

BOOST_AUTO_TEST_CASE(config_show_applies_overrides_in_order) {
  undertone::testing::temp_dir t;
  std::string f = (t.path / "c.toml").string();
  std::ofstream(f) << "[encoder]\nchunk_ms = 640\n[llm]\ndtype = \"bf16\"\n";
  auto r = run("--config " + f + " --set encoder.chunk_ms=160 config show");
  BOOST_CHECK_EQUAL(r.code, 0);
  BOOST_CHECK(has(r.out, "chunk_ms = 160"));  // --set beats the file
  BOOST_CHECK(has(r.out, "dtype = 'bf16'"));  // the file beats defaults
  auto bad = run("--set encoder.chunk_ms=5 config show");
  BOOST_CHECK_EQUAL(bad.code, 2);
  BOOST_CHECK(has(bad.out, "encoder.chunk_ms must be in [80, 2000], got 5"));
}

BOOST_AUTO_TEST_CASE(unknown_subcommand_is_an_error) {
  auto r = run("frobnicate");
  BOOST_CHECK_NE(r.code, 0);
}
