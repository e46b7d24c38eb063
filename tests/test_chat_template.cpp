// Chat templates vs jinja2's rendering of the models' Jinja templates
// (tests/golden/chat_golden.json, written by make_tokenizer_golden.py), and the
// SmolLM2 prompt's token ids vs llama.cpp.
#include <boost/test/unit_test.hpp>

#include <fstream>
#include <nlohmann/json.hpp>

#include "models/chat_template.hpp"
#include "models/gguf.hpp"
#include "models/tokenizer.hpp"
#include "tests/support.hpp"

using namespace undertone::models;
using json = nlohmann::json;
namespace ut = undertone::testing;

namespace {

const json& golden() {
  static const json j = ut::read_golden_json("chat_golden.json");
  return j;
}

std::vector<chat_message> conversation(size_t i) {
  std::vector<chat_message> out;
  for (const auto& m : golden()["conversations"][i]) {
    out.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
  }
  return out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(detected_templates_render_like_jinja2) {
  size_t n = 0;
  for (const auto& c : golden()["cases"]) {
    const std::string name = c["template"].get<std::string>();
    const auto tpl = chat_template::detect(golden()["templates"][name].get<std::string>());
    const std::string got = tpl.apply(conversation(c["conversation"].get<size_t>()), c["add_generation_prompt"].get<bool>());
    BOOST_CHECK_MESSAGE(got == c["text"].get<std::string>(),
                        name << " conversation " << c["conversation"] << " gen " << c["add_generation_prompt"]
                             << ":\n got:\n" << got << "\n want:\n" << c["text"].get<std::string>());
    ++n;
  }
  BOOST_CHECK_GE(n, 30u);
}

BOOST_AUTO_TEST_CASE(detection_and_default_system_prompts) {
  const auto& t = golden()["templates"];
  const auto smol = chat_template::detect(t["smollm2"].get<std::string>());
  BOOST_CHECK_EQUAL(smol.name(), "chatml");
  BOOST_CHECK_EQUAL(smol.default_system(), "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  BOOST_CHECK_EQUAL(chat_template::detect(t["qwen2"].get<std::string>()).default_system(), "You are a helpful assistant.");
  BOOST_CHECK_EQUAL(chat_template::detect(t["chatml"].get<std::string>()).default_system(), "");
  BOOST_CHECK_EQUAL(chat_template::detect(t["llama3"].get<std::string>()).name(), "llama3");
  BOOST_CHECK_EQUAL(chat_template::select("auto", t["llama3"].get<std::string>()).name(), "llama3");
  BOOST_CHECK_EQUAL(chat_template::select("chatml", "").name(), "chatml");
  BOOST_CHECK_EQUAL(chat_template::named("llama-3").name(), "llama3");
  BOOST_CHECK_THROW(chat_template::detect("{{ messages }}"), tokenizer_error);
  BOOST_CHECK_THROW(chat_template::detect(""), tokenizer_error);
  BOOST_CHECK_THROW(chat_template::named("vicuna"), tokenizer_error);
}

BOOST_AUTO_TEST_CASE(smollm_prompt_ids_match_llama_cpp) {
  gguf_file f(ut::llm_gguf_path());
  auto tok = tokenizer::from_gguf(f);
  const auto tpl = chat_template::select("auto", tok->chat_template_text());
  for (const auto& c : golden()["cases"]) {
    if (c["template"] != "smollm2") continue;
    const std::string text = tpl.apply(conversation(c["conversation"].get<size_t>()), c["add_generation_prompt"].get<bool>());
    BOOST_CHECK(tok->encode(text, true) == c["smollm_ids"].get<std::vector<int32_t>>());
  }
}
