// encoder_registry (models/encoder_registry.hpp): publish / current / list /
// rollback / verify on small projector files written with the safetensors
// writer; corrupt sources and versions (truncated, flipped byte, wrong shape,
// NaN weights, missing meta.json) are refused with `current` unchanged; a
// leftover temporary directory of a "crashed" publish is ignored and cleaned.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include "models/encoder_registry.hpp"
#include "models/model_store.hpp"
#include "models/safetensors.hpp"
#include "tests/support.hpp"

namespace ut = undertone::testing;
namespace fs = std::filesystem;
using namespace undertone::models;

namespace {

// A projector checkpoint in projector::save's format (F32), values from `seed`.
void write_projector(const std::string& path, int64_t stack, int64_t d_in, int64_t d_hidden, int64_t d_out,
                     float seed = 0.1f, bool nan = false) {
  std::vector<float> gate(size_t(d_hidden * stack * d_in)), up(gate.size()), down(size_t(d_out * d_hidden));
  for (size_t i = 0; i < gate.size(); ++i) gate[i] = seed * float(i % 7) - 0.3f, up[i] = seed * float(i % 5);
  for (size_t i = 0; i < down.size(); ++i) down[i] = seed * float(i % 3) - 0.1f;
  if (nan) down[3] = std::numeric_limits<float>::quiet_NaN();
  write_safetensors(path,
                    {{"gate.weight", st_dtype::f32, {d_hidden, stack * d_in}, gate.data()},
                     {"up.weight", st_dtype::f32, {d_hidden, stack * d_in}, up.data()},
                     {"down.weight", st_dtype::f32, {d_out, d_hidden}, down.data()}},
                    {{"format", "undertone.projector"},
                     {"version", "1"},
                     {"stack", std::to_string(stack)},
                     {"d_in", std::to_string(d_in)},
                     {"d_hidden", std::to_string(d_hidden)},
                     {"d_out", std::to_string(d_out)},
                     {"activation", "swiglu"}});
}

size_t count_dirs(const fs::path& p) {
  size_t n = 0;
  for (const auto& e : fs::directory_iterator(p)) n += e.is_directory() ? 1 : 0;
  return n;
}

struct fixture {
  ut::temp_dir tmp;
  std::string a, b, c;  // three good projectors of one shape
  fixture() {
    a = (tmp.path / "a.safetensors").string();
    b = (tmp.path / "b.safetensors").string();
    c = (tmp.path / "c.safetensors").string();
    write_projector(a, 2, 4, 8, 6, 0.1f);
    write_projector(b, 2, 4, 8, 6, 0.2f);
    write_projector(c, 2, 4, 16, 6, 0.3f);  // another hidden width: allowed
  }
  std::string reg_dir() const { return (tmp.path / "registry").string(); }
};

}  // namespace

BOOST_FIXTURE_TEST_SUITE(encoder_registry_suite, fixture)

BOOST_AUTO_TEST_CASE(publish_current_list_meta) {
  encoder_registry reg(reg_dir());
  BOOST_TEST(!reg.current().has_value());
  BOOST_TEST(reg.list().empty());
  const auto v1 = reg.publish(a, {{"source", "unit test"}, {"metrics", {{"val_loss", 1.25}}}});
  BOOST_TEST(v1 == "v0001");
  BOOST_TEST(reg.current().value() == "v0001");
  // Not current unless asked.
  const auto v2 = reg.publish(b, nlohmann::json(), false);
  BOOST_TEST(v2 == "v0002");
  BOOST_TEST(reg.current().value() == "v0001");
  const auto v3 = reg.publish(c, {{"note", "kept as is"}});
  BOOST_TEST(reg.current().value() == v3);

  auto vs = reg.list();
  BOOST_REQUIRE_EQUAL(vs.size(), 3u);
  BOOST_TEST(vs[0].name == "v0001");
  BOOST_TEST(vs[2].current);
  BOOST_TEST(!vs[0].current);
  const auto& m1 = vs[0].meta;
  BOOST_TEST(m1["source"].get<std::string>() == "unit test");
  BOOST_TEST(m1["metrics"]["val_loss"].get<double>() == 1.25);
  BOOST_TEST(m1["parent"].is_null());
  BOOST_TEST(m1["files"]["projector.safetensors"]["sha256"].get<std::string>() == sha256_file(a));
  BOOST_TEST(m1["projector"]["d_out"].get<int64_t>() == 6);
  BOOST_TEST(vs[2].meta["parent"].get<std::string>() == "v0001");  // current when v0003 was published
  BOOST_TEST(vs[2].meta["note"].get<std::string>() == "kept as is");
  BOOST_TEST(vs[1].meta["source"].get<std::string>() == fs::absolute(b).string());
  // The copy is byte-identical and stands alone.
  BOOST_TEST(sha256_file(reg.path_of(v2)) == sha256_file(b));
  fs::remove(b);
  reg.verify(v2);
  BOOST_TEST(reg.encoder_layers_of(v2).empty());
  BOOST_CHECK_THROW(reg.path_of("v0009"), registry_error);
  BOOST_CHECK_THROW(reg.path_of("../x"), registry_error);

  const auto h = reg.history();
  BOOST_REQUIRE_EQUAL(h.size(), 3u);
  BOOST_TEST(h[1]["event"].get<std::string>() == "publish");
  BOOST_TEST(!h[1]["current"].get<bool>());
}

BOOST_AUTO_TEST_CASE(rollback_walks_back_and_named_rollback) {
  encoder_registry reg(reg_dir());
  reg.publish(a, {});  // v0001
  reg.publish(b, {});  // v0002
  reg.publish(c, {});  // v0003
  BOOST_TEST(reg.rollback_target().value() == "v0002");
  BOOST_TEST(reg.rollback() == "v0002");
  BOOST_TEST(reg.current().value() == "v0002");
  BOOST_TEST(reg.rollback() == "v0001");  // one step further back each time
  BOOST_TEST(reg.current().value() == "v0001");
  BOOST_CHECK_THROW(reg.rollback(), registry_error);  // nothing before v0001
  BOOST_TEST(reg.current().value() == "v0001");
  BOOST_TEST(reg.rollback("v0003") == "v0003");  // named
  BOOST_TEST(reg.current().value() == "v0003");
  BOOST_TEST(reg.rollback() == "v0001");  // undoes the named rollback
  reg.set_current("v0002");
  BOOST_TEST(reg.current().value() == "v0002");
  BOOST_TEST(reg.rollback() == "v0001");
  // A reader sees the history of every change.
  BOOST_TEST(reg.history().size() == 9u);
}

BOOST_AUTO_TEST_CASE(bad_sources_are_refused_and_nothing_changes) {
  encoder_registry reg(reg_dir());
  reg.publish(a, {});
  const fs::path versions = fs::path(reg_dir()) / "versions";
  auto refused = [&](const std::string& file, const std::string& why) {
    BOOST_TEST_CONTEXT(why) {
      BOOST_CHECK_THROW(reg.publish(file, {}), registry_error);
      BOOST_TEST(reg.current().value() == "v0001");
      BOOST_TEST(reg.list().size() == 1u);
      BOOST_TEST(count_dirs(versions) == 1u);  // no temp dir left behind
    }
  };
  const std::string trunc = (tmp.path / "trunc.safetensors").string();
  ut::copy_prefix(a, trunc, size_t(fs::file_size(a)) - 10);
  refused(trunc, "truncated file");
  const std::string header = (tmp.path / "header.safetensors").string();
  fs::copy_file(a, header);
  ut::corrupt_byte(header, 20);  // inside the JSON header
  refused(header, "flipped byte in the header");
  const std::string wrong = (tmp.path / "wrong.safetensors").string();
  write_projector(wrong, 2, 4, 8, 5);  // d_out 5, current has 6
  refused(wrong, "wrong shape");
  const std::string stack = (tmp.path / "stack.safetensors").string();
  write_projector(stack, 4, 4, 8, 6);
  refused(stack, "other stacking");
  const std::string nan = (tmp.path / "nan.safetensors").string();
  write_projector(nan, 2, 4, 8, 6, 0.1f, true);
  refused(nan, "NaN weights");
  const std::string other = (tmp.path / "other.safetensors").string();
  std::vector<float> x(4, 1.0f);
  write_safetensors(other, {{"x", st_dtype::f32, {4}, x.data()}});
  refused(other, "not a projector");
  refused((tmp.path / "missing.safetensors").string(), "missing file");
  try {
    reg.publish(wrong, {});
  } catch (const registry_error& e) {
    BOOST_TEST(std::string(e.what()).find("wrong.safetensors") != std::string::npos);
  }
}

BOOST_AUTO_TEST_CASE(corrupt_versions_fail_verify_and_are_not_made_current) {
  encoder_registry reg(reg_dir());
  reg.publish(a, {});  // v0001
  reg.publish(b, {});  // v0002 (current)
  reg.publish(c, {}, false);  // v0003
  reg.verify("v0001");
  reg.verify("v0003");

  // Flipped byte in the data section: the header is fine, the sha256 is not.
  const auto p1 = reg.path_of("v0001");
  ut::corrupt_byte(p1, size_t(fs::file_size(p1)) - 100);
  BOOST_CHECK_THROW(reg.verify("v0001"), registry_error);
  BOOST_CHECK_THROW(reg.rollback(), registry_error);  // the previous current is v0001
  BOOST_TEST(reg.current().value() == "v0002");
  BOOST_CHECK_THROW(reg.set_current("v0001"), registry_error);
  BOOST_TEST(reg.current().value() == "v0002");

  // Truncated.
  const auto p3 = reg.path_of("v0003");
  fs::resize_file(p3, fs::file_size(p3) / 2);
  try {
    reg.verify("v0003");
    BOOST_FAIL("truncated version verified");
  } catch (const registry_error& e) {
    BOOST_TEST(std::string(e.what()).find("v0003") != std::string::npos);
  }
  BOOST_CHECK_THROW(reg.rollback("v0003"), registry_error);
  BOOST_TEST(reg.current().value() == "v0002");

  // A version directory without meta.json (copied by hand, half-done).
  fs::create_directories(fs::path(reg_dir()) / "versions" / "v0007");
  fs::copy_file(a, fs::path(reg_dir()) / "versions" / "v0007" / "projector.safetensors");
  auto vs = reg.list();
  BOOST_REQUIRE_EQUAL(vs.size(), 4u);
  BOOST_TEST(!vs[3].ok);
  BOOST_CHECK_THROW(reg.verify("v0007"), registry_error);
  BOOST_CHECK_THROW(reg.set_current("v0007"), registry_error);
  reg.verify("v0002");
  BOOST_TEST(reg.current().value() == "v0002");
  // The next publish numbers after every directory.
  BOOST_TEST(reg.publish(a, {}, false) == "v0008");
}

BOOST_AUTO_TEST_CASE(leftover_temp_dir_from_a_crash_is_ignored_and_cleaned) {
  encoder_registry reg(reg_dir());
  reg.publish(a, {});
  // A publish that died half-way: a temp dir with a partial copy, owned by a
  // process that no longer exists.
  const fs::path dead = fs::path(reg_dir()) / "versions" / ".tmp-999999999-1-0";
  fs::create_directories(dead);
  ut::copy_prefix(a, (dead / "projector.safetensors").string(), 100);
  BOOST_TEST(reg.list().size() == 1u);
  BOOST_TEST(reg.current().value() == "v0001");
  // A temp dir of a live process (this one) is left alone.
  const fs::path live = fs::path(reg_dir()) / "versions" / (".tmp-" + std::to_string(::getpid()) + "-9-9");
  fs::create_directories(live);
  BOOST_TEST(reg.clean_temp() == 1u);
  BOOST_TEST(!fs::exists(dead));
  BOOST_TEST(fs::exists(live));
  fs::create_directories(dead);
  BOOST_TEST(reg.publish(b, {}) == "v0002");  // publish cleans too
  BOOST_TEST(!fs::exists(dead));
  BOOST_TEST(reg.list().size() == 2u);

  // A torn last line of history.jsonl (crash while appending) is skipped.
  {
    std::ofstream h(fs::path(reg_dir()) / "history.jsonl", std::ios::app);
    h << "{\"event\":\"publ";
  }
  BOOST_TEST(reg.history().size() == 2u);
  BOOST_TEST(reg.rollback() == "v0001");
}

BOOST_AUTO_TEST_CASE(check_projector_file_reports_shape) {
  auto s = check_projector_file(c);
  BOOST_TEST(s.stack == 2);
  BOOST_TEST(s.d_in == 4);
  BOOST_TEST(s.d_hidden == 16);
  BOOST_TEST(s.d_out == 6);
  BOOST_TEST(s.dtype == "F32");
}

BOOST_AUTO_TEST_SUITE_END()
