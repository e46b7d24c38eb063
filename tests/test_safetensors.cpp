// safetensors reader/writer: files written by the reference `safetensors`
// package (tests/golden/hf, made by tests/golden/make_hf_golden.py), round
// trips through our writer, and corrupted / truncated / inconsistent files.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "models/safetensors.hpp"
#include "support.hpp"

namespace fs = std::filesystem;
using namespace undertone::models;
using undertone::testing::temp_dir;
using json = nlohmann::json;

namespace {

json golden() {
  std::ifstream in(undertone::testing::source_dir() + "/tests/golden/hf/golden.json");
  BOOST_REQUIRE_MESSAGE(in, "missing tests/golden/hf/golden.json (run tests/golden/make_hf_golden.py)");
  return json::parse(in);
}

std::string golden_path(const std::string& rel) { return undertone::testing::source_dir() + "/tests/golden/" + rel; }

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

// A file with the given header text (not validated) and data section.
std::string raw_file(const std::string& header, const std::string& data, uint64_t declared_len = UINT64_MAX) {
  uint64_t n = declared_len == UINT64_MAX ? header.size() : declared_len;
  std::string s(8, '\0');
  std::memcpy(s.data(), &n, 8);
  return s + header + data;
}

// Expects opening `path` to throw safetensors_error whose message contains
// every string of `needles` (and always the path).
void expect_error(const std::string& path, const std::vector<std::string>& needles) {
  try {
    safetensors_file f(path);
    BOOST_ERROR("opening " << path << " should have failed (expected: " << needles.front() << ")");
  } catch (const safetensors_error& e) {
    const std::string msg = e.what();
    BOOST_TEST_MESSAGE("error as expected: " << msg);
    BOOST_TEST(msg.find(path) != std::string::npos, "message names the file: " << msg);
    for (const auto& n : needles) BOOST_TEST(msg.find(n) != std::string::npos, "'" << n << "' in: " << msg);
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(reads_every_dtype_written_by_the_reference) {
  const json g = golden()["dtypes"];
  safetensors_file f(golden_path(g["file"]));
  BOOST_TEST(f.metadata().size() == g["metadata"].size());
  for (const auto& [k, v] : g["metadata"].items()) BOOST_TEST(f.metadata().at(k) == v.get<std::string>());
  BOOST_TEST(f.tensors().size() == g["tensors"].size());
  for (const auto& [name, t] : g["tensors"].items()) {
    BOOST_TEST_CONTEXT("tensor " << name) {
      const st_tensor_info& info = f.at(name);
      BOOST_TEST(st_dtype_name(info.dtype) == t["dtype"].get<std::string>());
      BOOST_TEST(info.shape == t["shape"].get<std::vector<int64_t>>(), boost::test_tools::per_element());
      const auto values = t["values"].get<std::vector<double>>();
      BOOST_REQUIRE_EQUAL(info.n_elements(), int64_t(values.size()));
      BOOST_TEST(info.n_bytes() == uint64_t(info.n_elements()) * st_dtype_size(info.dtype));
      std::vector<float> out(values.size());
      f.to_float32(info, out.data());
      for (size_t i = 0; i < values.size(); ++i) BOOST_TEST(out[i] == float(values[i]), "index " << i);
    }
  }
  BOOST_TEST(f.at("scalar").shape.empty());
  BOOST_TEST(f.at("empty").n_bytes() == 0u);
  BOOST_CHECK_THROW(f.at("no_such_tensor"), safetensors_error);
  BOOST_TEST(f.find("no_such_tensor") == nullptr);
}

BOOST_AUTO_TEST_CASE(reads_transformers_checkpoints) {
  // Every tensor of the three tiny HF checkpoints: dtype, shape and sums as
  // computed by the reference reader (safe_open + torch, float64).
  const json g = golden();
  size_t checked = 0;
  for (const auto& m : g["models"]) {
    for (const auto& [name, t] : m["tensors"].items()) {
      BOOST_TEST_CONTEXT(m["name"].get<std::string>() << ": " << name) {
        safetensors_file f(golden_path(m["dir"].get<std::string>() + "/" + t["file"].get<std::string>()));
        BOOST_TEST(f.metadata().at("format") == "pt");
        const st_tensor_info& info = f.at(name);
        const std::string want = t["dtype"] == "float32" ? "F32" : t["dtype"] == "float16" ? "F16" : "BF16";
        BOOST_TEST(st_dtype_name(info.dtype) == want);
        BOOST_TEST(info.shape == t["shape"].get<std::vector<int64_t>>(), boost::test_tools::per_element());
        std::vector<float> out(size_t(info.n_elements()));
        f.to_float32(info, out.data());
        double sum = 0, abs_sum = 0;
        for (float x : out) sum += x, abs_sum += std::fabs(x);
        const double tol = 1e-9 * (1 + t["abs_sum"].get<double>());  // summation order only
        BOOST_TEST(std::fabs(sum - t["sum"].get<double>()) <= tol);
        BOOST_TEST(std::fabs(abs_sum - t["abs_sum"].get<double>()) <= tol);
        const auto first = t["first"].get<std::vector<double>>();
        for (size_t i = 0; i < first.size(); ++i) BOOST_TEST(double(out[i]) == first[i]);
        ++checked;
      }
    }
  }
  BOOST_TEST(checked > 60u);
}

BOOST_AUTO_TEST_CASE(round_trip_all_dtypes) {
  temp_dir tmp;
  const std::string path = tmp.str() + "/rt.safetensors";
  std::vector<double> f64 = {1.5, -2.25, 1e300};
  std::vector<float> f32 = {0.1f, -3.0f, 7.25f, 1e-30f, -0.0f, 65504.0f};
  std::vector<uint16_t> f16 = {0x3C00, 0xC000, 0x7BFF, 0x0001};  // 1, -2, 65504, smallest subnormal
  std::vector<uint16_t> bf16 = {0x3F80, 0xC040, 0x0000};          // 1, -3, 0
  std::vector<int64_t> i64 = {INT64_MIN, -1, INT64_MAX};
  std::vector<int32_t> i32 = {-5, 6};
  std::vector<int16_t> i16 = {-300};
  std::vector<int8_t> i8 = {-128, 127, 3};
  std::vector<uint8_t> u8 = {0, 255, 17, 42, 9};
  std::vector<uint8_t> b = {1, 0, 1};
  std::vector<float> scalar = {42.0f};
  std::vector<st_tensor_view> views = {
      {"f64", st_dtype::f64, {3}, f64.data()},       {"f32", st_dtype::f32, {2, 3}, f32.data()},
      {"f16", st_dtype::f16, {2, 2}, f16.data()},    {"bf16", st_dtype::bf16, {3, 1}, bf16.data()},
      {"i64", st_dtype::i64, {3}, i64.data()},       {"i32", st_dtype::i32, {1, 2}, i32.data()},
      {"i16", st_dtype::i16, {1}, i16.data()},       {"i8", st_dtype::i8, {3}, i8.data()},
      {"u8", st_dtype::u8, {5}, u8.data()},          {"flags", st_dtype::boolean, {3}, b.data()},
      {"scalar", st_dtype::f32, {}, scalar.data()}, {"empty", st_dtype::f32, {0, 4}, nullptr},
      {"model.layers.0.weird name/ä", st_dtype::u8, {1}, u8.data()},
  };
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"step", "12"}, {"quote", "a \"b\"\n"}};
  write_safetensors(path, views, meta);

  // Nothing but the file itself is left in the directory.
  size_t n_files = 0;
  for (const auto& e : fs::directory_iterator(tmp.path)) n_files += e.is_regular_file(), (void)e;
  BOOST_TEST(n_files == 1u);

  // The data section is 8-byte aligned, as the reference writer does it.
  const std::string bytes = read_bytes(path);
  uint64_t n_header = 0;
  std::memcpy(&n_header, bytes.data(), 8);
  BOOST_TEST((8 + n_header) % 8 == 0u);

  safetensors_file f(path);
  BOOST_TEST((f.metadata() == meta));
  BOOST_TEST(f.tensors().size() == views.size());
  for (const auto& v : views) {
    BOOST_TEST_CONTEXT(v.name) {
      const st_tensor_info& t = f.at(v.name);
      BOOST_TEST(st_dtype_name(t.dtype) == st_dtype_name(v.dtype));
      BOOST_TEST(t.shape == v.shape, boost::test_tools::per_element());
      if (t.n_bytes() > 0) BOOST_TEST(std::memcmp(f.data(t), v.data, size_t(t.n_bytes())) == 0);
    }
  }
  std::vector<float> out(4);
  f.to_float32(f.at("f16"), out.data());
  BOOST_TEST(out[0] == 1.0f);
  BOOST_TEST(out[1] == -2.0f);
  BOOST_TEST(out[2] == 65504.0f);
  BOOST_TEST(out[3] == std::ldexp(1.0f, -24));
  f.to_float32(f.at("bf16"), out.data());
  BOOST_TEST(out[1] == -3.0f);
  f.to_float32(f.at("flags"), out.data());
  BOOST_TEST((out[0] == 1.0f && out[1] == 0.0f && out[2] == 1.0f));

  // Overwriting an existing file replaces it (atomically: the old mapping stays valid).
  std::vector<float> one = {9.0f};
  write_safetensors(path, {{"only", st_dtype::f32, {1}, one.data()}});
  BOOST_TEST(f.at("f32").n_elements() == 6);  // old file still mapped
  safetensors_file g(path);
  BOOST_TEST(g.tensors().size() == 1u);
  BOOST_TEST(g.metadata().empty());
  g.to_float32(g.at("only"), out.data());
  BOOST_TEST(out[0] == 9.0f);
}

BOOST_AUTO_TEST_CASE(writer_rejects_bad_input_and_leaves_no_temp_file) {
  temp_dir tmp;
  const std::string path = tmp.str() + "/w.safetensors";
  float x = 1;
  BOOST_CHECK_THROW(write_safetensors(path, {{"a", st_dtype::f32, {1}, &x}, {"a", st_dtype::f32, {1}, &x}}),
                    safetensors_error);
  BOOST_CHECK_THROW(write_safetensors(path, {{"__metadata__", st_dtype::f32, {1}, &x}}), safetensors_error);
  BOOST_CHECK_THROW(write_safetensors(path, {{"", st_dtype::f32, {1}, &x}}), safetensors_error);
  BOOST_CHECK_THROW(write_safetensors(path, {{"neg", st_dtype::f32, {-1}, &x}}), safetensors_error);
  BOOST_CHECK_THROW(write_safetensors(path, {{"null", st_dtype::f32, {2}, nullptr}}), safetensors_error);
  BOOST_CHECK_THROW(write_safetensors(tmp.str() + "/no/such/dir/w.safetensors", {{"a", st_dtype::f32, {1}, &x}}),
                    safetensors_error);
  BOOST_TEST(fs::is_empty(tmp.path));
}

BOOST_AUTO_TEST_CASE(rejects_corrupt_headers) {
  temp_dir tmp;
  int k = 0;
  auto make = [&](const std::string& bytes) {
    const std::string p = tmp.str() + "/bad" + std::to_string(k++) + ".safetensors";
    write_bytes(p, bytes);
    return p;
  };
  const std::string d12(12, '\x01');
  auto hdr = [](const std::string& entries) { return "{" + entries + "}"; };
  const std::string ok = R"("w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]})";

  // Sanity: the well-formed variant loads.
  { safetensors_file f(make(raw_file(hdr(ok), d12))); BOOST_TEST(f.tensors().size() == 1u); }

  expect_error(make(""), {"too small"});
  expect_error(make("abc"), {"too small"});
  expect_error(make(raw_file(hdr(ok), d12, 1000)), {"header length 1000 exceeds"});
  expect_error(make(raw_file(hdr(ok), d12, UINT64_MAX - 3)), {"exceeds"});
  expect_error(make(raw_file(R"({"w":{"dtype":"F32",)", "")), {"not valid JSON"});
  expect_error(make(raw_file("[1,2]", "")), {"'{'"});
  expect_error(make(raw_file(R"({"w":[1]})", "")), {"'w'", "not a JSON object"});
  expect_error(make(raw_file(hdr(R"("w":{"dtype":"F7","shape":[3],"data_offsets":[0,12]})"), d12)),
               {"'w'", "F7"});
  expect_error(make(raw_file(hdr(R"("w":{"dtype":7,"shape":[3],"data_offsets":[0,12]})"), d12)), {"'w'", "dtype"});
  expect_error(make(raw_file(hdr(R"("w":{"dtype":"F32","shape":[-3],"data_offsets":[0,12]})"), d12)),
               {"'w'", "shape"});
  expect_error(make(raw_file(hdr(R"("w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,12]})"), d12)),
               {"'w'", "shape"});
  expect_error(make(raw_file(hdr(R"("w":{"dtype":"F32","data_offsets":[0,12]})"), d12)), {"'w'", "shape"});
  expect_error(make(raw_file(hdr(R"("w":{"dtype":"F32","shape":[3],"data_offsets":[0]})"), d12)),
               {"'w'", "data_offsets"});
  expect_error(make(raw_file(hdr(R"("w":{"dtype":"F32","shape":[3],"data_offsets":[-4,12]})"), d12)),
               {"'w'", "data_offsets"});
  // numel * element size != bytes
  expect_error(make(raw_file(hdr(R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,12]})"), d12)),
               {"'w'", "needs 8"});
  expect_error(make(raw_file(hdr(R"("w":{"dtype":"F16","shape":[3],"data_offsets":[0,12]})"), d12)), {"'w'"});
  // end before begin
  expect_error(make(raw_file(hdr(R"("w":{"dtype":"F32","shape":[0],"data_offsets":[12,0]})"), d12)), {"'w'"});
  // shape whose byte size overflows 64 bits
  expect_error(make(raw_file(hdr(R"("w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]})"),
                             "")),
               {"'w'", "overflows"});
  // offsets beyond the data section
  expect_error(make(raw_file(hdr(R"("w":{"dtype":"F32","shape":[3],"data_offsets":[4,16]})"), d12)),
               {"'w'", "beyond the data section"});
  expect_error(make(raw_file(hdr(R"("w":{"dtype":"F32","shape":[3],"data_offsets":[18446744073709551600,18446744073709551612]})"), d12)),
               {"'w'"});
  // overlap, hole, trailing bytes
  expect_error(make(raw_file(hdr(R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                 R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]})"),
                             d12)),
               {"overlaps"});
  expect_error(make(raw_file(hdr(R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                 R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]})"),
                             d12)),
               {"hole", "'b'"});
  expect_error(make(raw_file(hdr(ok), d12 + "xyz")), {"trailing"});
  // metadata must be a string -> string map
  expect_error(make(raw_file(hdr(R"("__metadata__":{"n":3},)" + ok), d12)), {"__metadata__"});
  expect_error(make(raw_file(hdr(R"("__metadata__":[],)" + ok), d12)), {"__metadata__"});
  // not a file
  BOOST_CHECK_THROW(safetensors_file(tmp.str()), safetensors_error);
  BOOST_CHECK_THROW(safetensors_file(tmp.str() + "/does-not-exist"), safetensors_error);
}

BOOST_AUTO_TEST_CASE(every_truncation_and_header_byte_flip_fails_cleanly) {
  // Truncating a valid file anywhere must raise safetensors_error; flipping any
  // header byte must raise it or (if the JSON stays valid and consistent) load.
  // Neither may crash or read out of bounds (run under ASan/valgrind to see).
  temp_dir tmp;
  const std::string src = tmp.str() + "/src.safetensors";
  std::vector<float> a = {1, 2, 3, 4, 5, 6};
  std::vector<uint16_t> b = {1, 2, 3};
  write_safetensors(src, {{"a", st_dtype::f32, {2, 3}, a.data()}, {"b", st_dtype::bf16, {3}, b.data()}},
                    {{"k", "v"}});
  const std::string bytes = read_bytes(src);
  const std::string p = tmp.str() + "/cut.safetensors";
  for (size_t n = 0; n < bytes.size(); ++n) {
    write_bytes(p, bytes.substr(0, n));
    BOOST_CHECK_THROW(safetensors_file{p}, safetensors_error);
  }
  uint64_t n_header = 0;
  std::memcpy(&n_header, bytes.data(), 8);
  size_t loaded = 0, failed = 0;
  for (size_t i = 0; i < 8 + n_header; ++i) {
    std::string c = bytes;
    c[i] = char(c[i] ^ 0x5A);
    write_bytes(p, c);
    try {
      safetensors_file f(p);
      std::vector<float> out(16);
      for (const auto& t : f.tensors())
        if (t.n_elements() <= 16 && t.dtype != st_dtype::f8_e4m3 && t.dtype != st_dtype::f8_e5m2)
          f.to_float32(t, out.data());
      ++loaded;
    } catch (const safetensors_error&) {
      ++failed;
    }
  }
  BOOST_TEST_MESSAGE("header byte flips: " << failed << " rejected, " << loaded << " still valid");
  BOOST_TEST(failed > 8 + n_header / 2);
}
