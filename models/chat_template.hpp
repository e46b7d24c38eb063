// Chat prompt formatting (chatml, llama-3) without a Jinja engine.
//
// Models ship a Jinja chat template (GGUF tokenizer.chat_template or
// tokenizer_config.json chat_template). Rather than interpreting Jinja, undertone
// recognises the two formats its model families use and renders them in C++:
//   chatml  : "<|im_start|>{role}\n{content}<|im_end|>\n" per message, generation
//             prompt "<|im_start|>assistant\n" (SmolLM2, Qwen2, ...).
//   llama3  : "<|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>"
//             per message, the first prefixed with the BOS text when the template
//             uses bos_token; generation prompt
//             "<|start_header_id|>assistant<|end_header_id|>\n\n" (Llama 3 / 3.0).
// Default system prompt (chatml): only when the template text itself inserts one —
// i.e. it tests `messages[0]['role'] != 'system'` and contains a literal
// "<|im_start|>system\n...<|im_end|>" block (SmolLM2: "You are a helpful AI assistant
// named SmolLM, trained by Hugging Face"; Qwen2: "You are a helpful assistant.") —
// is that text inserted as a system message before a conversation whose first
// message is not a system message. Templates with tool or date logic (Llama 3.1+,
// Qwen2.5) are rendered in their plain-conversation form without those extras.
// Output equals jinja2's rendering of the model's template for plain conversations
// (tests/test_chat_template.cpp against tests/golden/chat_golden.json).
#pragma once

#include <string>
#include <vector>

namespace undertone::models {

/// One conversation turn; role is "system", "user" or "assistant".
struct chat_message {
  std::string role;
  std::string content;
};

enum class chat_format { chatml, llama3 };

class chat_template {
 public:
  /// Recognises the format of a Jinja template text. Throws tokenizer_error when it is
  /// neither chatml ("<|im_start|>") nor llama-3 ("<|start_header_id|>").
  static chat_template detect(const std::string& template_text, const std::string& bos_text = "<|begin_of_text|>");
  /// By name: "chatml" (no default system prompt), "llama3" / "llama-3" (with BOS text).
  static chat_template named(const std::string& name, const std::string& bos_text = "<|begin_of_text|>");
  /// name "auto" (or empty): detect(template_text); anything else: named(name).
  static chat_template select(const std::string& name, const std::string& template_text,
                              const std::string& bos_text = "<|begin_of_text|>");

  chat_format format() const { return format_; }
  /// "chatml" or "llama3".
  std::string name() const;
  /// System prompt inserted when the conversation has none (empty: none).
  const std::string& default_system() const { return default_system_; }
  void set_default_system(std::string s) { default_system_ = std::move(s); }

  /// The prompt text for `messages` (to be encoded with parse_special = true, without
  /// adding BOS: the llama3 text already starts with it). With add_generation_prompt
  /// the text ends with the header that makes the model answer as the assistant.
  std::string apply(const std::vector<chat_message>& messages, bool add_generation_prompt) const;

 private:
  chat_format format_ = chat_format::chatml;
  std::string default_system_;
  std::string bos_text_;  ///< llama3: prefixed to the first message
};

}  // namespace undertone::models
