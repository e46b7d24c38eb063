#include "models/model_store.hpp"

#include <openssl/evp.h>

#include <filesystem>
#include <fstream>
#include <memory>

#include <nlohmann/json.hpp>

namespace fs = std::filesystem;

namespace undertone::models {

std::string sha256_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw model_store_error("cannot read " + path);
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1)
    throw model_store_error("sha256: OpenSSL init failed");
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), buf.data(), size_t(in.gcount()));
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx.get(), md, &len);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) out += hex[md[i] >> 4], out += hex[md[i] & 15];
  return out;
}

cached_model find_cached_model(const std::string& home, const std::string& name) {
  fs::path dir = fs::path(home) / "models" / name;
  fs::path manifest = dir / "manifest.json";
  if (!fs::exists(manifest))
    throw model_store_error("model '" + name + "' is not in the cache (" + manifest.string() +
                            " missing): run scripts/setup, or set llm.model/encoder.model to a path");
  nlohmann::json j;
  try {
    std::ifstream in(manifest);
    in >> j;
    cached_model m;
    m.name = j.at("name").get<std::string>();
    m.kind = j.at("kind").get<std::string>();
    m.dir = fs::absolute(dir).string();
    std::string main = j.at("main").get<std::string>();
    m.main = main == "." ? m.dir : (fs::absolute(dir) / main).string();
    m.source = j.value("source", "");
    for (const auto& f : j.at("files"))
      m.files.push_back({f.at("path").get<std::string>(), f.at("size").get<uint64_t>(), f.at("sha256").get<std::string>()});
    return m;
  } catch (const nlohmann::json::exception& e) {
    throw model_store_error(manifest.string() + " is unreadable (" + e.what() + "): re-run scripts/setup");
  }
}

void verify_model(const cached_model& m, bool hash) {
  for (const auto& f : m.files) {
    fs::path p = fs::path(m.dir) / f.path;
    std::error_code ec;
    auto size = fs::file_size(p, ec);
    if (ec) throw model_store_error(p.string() + " is missing: re-run scripts/setup");
    if (size != f.size)
      throw model_store_error(p.string() + " has " + std::to_string(size) + " bytes, expected " +
                              std::to_string(f.size) + ": delete " + m.dir + " and re-run scripts/setup");
    if (hash) {
      std::string got = sha256_file(p.string());
      if (got != f.sha256)
        throw model_store_error(p.string() + " sha256 " + got + " does not match the pinned " + f.sha256 +
                                ": delete " + m.dir + " and re-run scripts/setup");
    }
  }
}

std::string resolve_model_path(const std::string& home, const std::string& spec) {
  if (spec.find('/') != std::string::npos || fs::exists(spec)) {
    if (!fs::exists(spec)) throw model_store_error("model path " + spec + " does not exist");
    return spec;
  }
  cached_model m = find_cached_model(home, spec);
  verify_model(m, false);
  return m.main;
}

}  // namespace undertone::models
