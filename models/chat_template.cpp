#include "models/chat_template.hpp"

#include <regex>

#include "models/tokenizer.hpp"

namespace undertone::models {

namespace {

// Jinja's `trim` is Python's str.strip(): drop leading/trailing Unicode whitespace.
bool space_at(const std::string& s, size_t i, size_t& len) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) { len = 1; return true; }
  static const char* const wide[] = {"\xC2\x85", "\xC2\xA0", "\xE1\x9A\x80", "\xE2\x80\xA8", "\xE2\x80\xA9",
                                     "\xE2\x80\xAF", "\xE2\x81\x9F", "\xE3\x80\x80"};
  for (const char* w : wide) {
    const size_t n = std::char_traits<char>::length(w);
    if (s.compare(i, n, w) == 0) { len = n; return true; }
  }
  if (s.compare(i, 2, "\xE2\x80") == 0 && i + 2 < s.size()) {  // U+2000..U+200A
    const auto c2 = static_cast<unsigned char>(s[i + 2]);
    if (c2 >= 0x80 && c2 <= 0x8A) { len = 3; return true; }
  }
  return false;
}

std::string py_strip(const std::string& s) {
  size_t b = 0, len = 0;
  while (b < s.size() && space_at(s, b, len)) b += len;
  size_t e = s.size();
  while (e > b) {
    // step back over one (possibly multi-byte) character
    size_t p = e - 1;
    while (p > b && (static_cast<unsigned char>(s[p]) & 0xC0) == 0x80) --p;
    if (space_at(s, p, len) && p + len == e) e = p;
    else break;
  }
  return s.substr(b, e - b);
}

std::string unescape_jinja(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      const char n = s[++i];
      out += n == 'n' ? '\n' : n == 't' ? '\t' : n;
    } else {
      out += s[i];
    }
  }
  return out;
}

}  // namespace

chat_template chat_template::named(const std::string& name, const std::string& bos_text) {
  chat_template t;
  if (name == "chatml") {
    t.format_ = chat_format::chatml;
  } else if (name == "llama3" || name == "llama-3") {
    t.format_ = chat_format::llama3;
    t.bos_text_ = bos_text;
  } else {
    throw tokenizer_error("chat template: unknown format '" + name + "' (known: auto, chatml, llama3)");
  }
  return t;
}

chat_template chat_template::detect(const std::string& text, const std::string& bos_text) {
  chat_template t;
  if (text.find("<|start_header_id|>") != std::string::npos) {
    t.format_ = chat_format::llama3;
    if (text.find("bos_token") != std::string::npos) t.bos_text_ = bos_text;
    return t;
  }
  if (text.find("<|im_start|>") == std::string::npos) {
    throw tokenizer_error(text.empty() ? "chat template: the model has no chat template; choose 'chatml' or 'llama3'"
                                       : "chat template: unrecognised template (neither chatml nor llama-3); "
                                         "choose 'chatml' or 'llama3' explicitly");
  }
  t.format_ = chat_format::chatml;
  static const std::regex first_not_system(
      R"(messages\[0\](\[\s*['"]role['"]\s*\]|\.role)\s*!=\s*['"]system['"])");
  static const std::regex system_block(R"(<\|im_start\|>system(?:\n|\\n)([^'"]*?)<\|im_end\|>)");
  std::smatch m;
  if (std::regex_search(text, first_not_system) && std::regex_search(text, m, system_block)) {
    t.default_system_ = unescape_jinja(m[1].str());
  }
  return t;
}

chat_template chat_template::select(const std::string& name, const std::string& text, const std::string& bos_text) {
  if (name.empty() || name == "auto") return detect(text, bos_text);
  return named(name, bos_text);
}

std::string chat_template::name() const { return format_ == chat_format::chatml ? "chatml" : "llama3"; }

std::string chat_template::apply(const std::vector<chat_message>& messages, bool add_generation_prompt) const {
  std::string out;
  if (format_ == chat_format::chatml) {
    if (!messages.empty() && !default_system_.empty() && messages[0].role != "system") {
      out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
    }
    for (const auto& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    if (add_generation_prompt) out += "<|im_start|>assistant\n";
  } else {
    for (size_t i = 0; i < messages.size(); ++i) {
      if (i == 0) out += bos_text_;
      out += "<|start_header_id|>" + messages[i].role + "<|end_header_id|>\n\n" + py_strip(messages[i].content) +
             "<|eot_id|>";
    }
    if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  }
  return out;
}

}  // namespace undertone::models
