// The layering of docs/architecture.md, checked on the sources: which folder
// may include what. CMake's per-folder libraries enforce linking; this test
// catches includes that would compile only by accident.
#include <boost/test/unit_test.hpp>

#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

namespace fs = std::filesystem;

namespace {
std::vector<std::pair<std::string, std::string>> includes_in(const std::string& folder) {
  std::vector<std::pair<std::string, std::string>> out;
  static const std::regex inc(R"(^\s*#\s*include\s*[<"]([^>"]+)[>"])");
  fs::path root = fs::path(UT_SOURCE_DIR) / folder;
  if (!fs::exists(root)) return out;
  for (const auto& e : fs::recursive_directory_iterator(root)) {
    auto ext = e.path().extension().string();
    if (ext != ".cpp" && ext != ".hpp" && ext != ".h" && ext != ".cu") continue;
    std::ifstream in(e.path());
    std::string line;
    while (std::getline(in, line)) {
      std::smatch m;
      if (std::regex_search(line, m, inc)) out.emplace_back(fs::relative(e.path(), UT_SOURCE_DIR).string(), m[1]);
    }
  }
  return out;
}
bool starts(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }
bool is_torch(const std::string& h) { return starts(h, "torch/") || starts(h, "ATen/") || starts(h, "c10/"); }
bool is_caf(const std::string& h) { return starts(h, "caf/"); }
bool is_zmq(const std::string& h) { return starts(h, "zmq"); }
}  // namespace

BOOST_AUTO_TEST_CASE(models_never_include_caf_or_zeromq) {
  for (const auto& [file, h] : includes_in("models")) {
    BOOST_TEST_INFO(file << " includes " << h);
    BOOST_CHECK(!is_caf(h) && !is_zmq(h) && !starts(h, "actors/") && !starts(h, "transport/"));
  }
}

BOOST_AUTO_TEST_CASE(torch_only_in_models_nn_sources_and_headers) {
  for (const auto& [file, h] : includes_in("models")) {
    if (starts(file, "models/nn/")) continue;
    BOOST_TEST_INFO(file << " includes " << h << " (torch belongs in models/nn/)");
    BOOST_CHECK(!is_torch(h) && !starts(h, "models/nn/"));
  }
}

BOOST_AUTO_TEST_CASE(engine_layers_do_not_include_torch) {
  for (const char* folder : {"actors", "transport", "config"}) {
    for (const auto& [file, h] : includes_in(folder)) {
      BOOST_TEST_INFO(file << " includes " << h);
      BOOST_CHECK(!is_torch(h) && !starts(h, "models/nn/"));
    }
  }
}

BOOST_AUTO_TEST_CASE(actors_do_not_use_zeromq_and_transport_not_models) {
  for (const auto& [file, h] : includes_in("actors")) {
    BOOST_TEST_INFO(file << " includes " << h);
    BOOST_CHECK(!is_zmq(h));
  }
  for (const auto& [file, h] : includes_in("transport")) {
    BOOST_TEST_INFO(file << " includes " << h);
    // (transport) the message types are the one part of actors/ it may see (docs/architecture.md).
    BOOST_CHECK(!starts(h, "models/") && (!starts(h, "actors/") || h == "actors/messages.hpp"));
  }
  for (const auto& [file, h] : includes_in("config")) {
    BOOST_TEST_INFO(file << " includes " << h);
    BOOST_CHECK(!starts(h, "models/") && !starts(h, "actors/") && !starts(h, "transport/") && !is_caf(h) && !is_zmq(h));
  }
}

BOOST_AUTO_TEST_CASE(layering_scan_sees_sources) {
  // Guard against the scan silently finding nothing (wrong source dir).
  BOOST_CHECK_GT(includes_in("models").size(), 5u);
  BOOST_CHECK_GT(includes_in("config").size(), 1u);
}
