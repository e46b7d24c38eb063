// Typed configuration of every undertone component, read from TOML.
//
// One table of fields (config.cpp) drives parsing, validation, unknown-key
// detection, `--set key=value` overrides and printing, so a key is declared
// exactly once. config/default.toml documents every key; a test checks that it
// matches the built-in defaults.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace undertone::config {

/// Raised for any configuration problem; the message names the key, the bad
/// value and what is allowed.
class config_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct general_config {
  std::string log_level = "info";  ///< trace|debug|info|warn|error|off
  int64_t threads = 0;             ///< compute threads; 0 = all cores
  std::string model_home;          ///< model cache; "" = $UNDERTONE_HOME or ~/.cache/undertone
};

struct llm_config {
  std::string model = "smollm2-135m-instruct";  ///< cache name, .gguf file or HF directory
  std::string device = "cpu";                   ///< cpu | cuda | cuda:N
  std::string dtype = "auto";                   ///< auto | fp32 | bf16 | fp16 (weights and compute)
  int64_t context_tokens = 2048;                ///< max tokens per sequence (KV positions)
  int64_t kv_cells = 32768;                     ///< KV cache capacity, tokens over all sequences
  int64_t max_batch_rows = 512;                 ///< rows per batched step (prefill chunking)
  std::string chat_template = "auto";           ///< auto | chatml | llama-3
  std::string system_prompt;                    ///< "" = the model's default system prompt
  int64_t max_slots = 64;                       ///< conversations one worker serves at once
  std::string cpu_decode = "auto";              ///< auto | off: CPU matrix-vector kernels for decode steps
};

struct sampling_config {
  double temperature = 0.0;         ///< 0 = greedy
  int64_t top_k = 40;               ///< 0 = off
  double top_p = 0.95;              ///< 1 = off
  double repetition_penalty = 1.0;  ///< 1 = off
  int64_t seed = 42;                ///< -1 = random
  int64_t max_tokens = 256;         ///< answer length cap, tokens
};

struct encoder_config {
  std::string model = "whisper-tiny.en";  ///< cache name, CTranslate2 dir or HF Whisper dir
  std::string projector;                  ///< projector checkpoint; "" = default trained one
  std::string device = "cpu";
  std::string dtype = "fp32";
  int64_t chunk_ms = 320;         ///< block-causal chunk, ms of audio
  int64_t stack_frames = 8;       ///< encoder frames (20 ms each) per speech token
  int64_t max_batch = 32;         ///< chunks encoded in one call
  int64_t max_wait_ms = 10;       ///< wait for more chunks before a batch runs
  int64_t window_blocks = 0;      ///< cached blocks kept; 0 = as many as fit 30 s
  std::string normalization = "causal";  ///< causal | offline (log-mel clamp)
  std::string registry;           ///< versioned encoder checkpoints; "" = <model_home>/encoders
};

struct vad_config {
  double threshold_db = -50.0;   ///< frame energy above which speech is assumed, dBFS
  int64_t min_speech_ms = 100;   ///< voiced time before a turn starts
  int64_t end_silence_ms = 600;  ///< trailing silence that ends a turn
  int64_t max_turn_seconds = 30; ///< a turn is cut here
  double snr_db = 12.0;          ///< voiced frames must also be this far above the noise floor
  bool enabled = true;           ///< false = only the client's end_turn ends a turn
};

struct server_config {
  std::string bind = "tcp://127.0.0.1:5555";         ///< client endpoint (ROUTER)
  std::string worker_bind = "tcp://127.0.0.1:5556";  ///< remote llm workers connect here
  std::string control_bind = "tcp://127.0.0.1:5557"; ///< control endpoint (status, encoder swap); "" = off
  int64_t max_sessions = 64;
  int64_t max_frame_bytes = 1048576;  ///< larger frames are refused
  int64_t max_frames_per_second = 200; ///< per client
  int64_t remote_workers = 0;          ///< 0 = decode in-process
  int64_t worker_wait_s = 30;          ///< start-up wait for remote_workers; also how long a session waits for any worker
  int64_t worker_timeout_s = 5;        ///< a remote worker silent this long is dead (heartbeats every timeout / 5)
  int64_t idle_timeout_s = 300;        ///< a silent client's session is closed after this
  /// Shared secret clients, workers and control requests must present ("" = no
  /// authentication). Resolution with the env UNDERTONE_AUTH_TOKEN: transport/auth.hpp.
  std::string auth_token;
  std::string auth_token_file;         ///< file whose first line is the token (instead of auth_token)
};

struct store_config {
  bool enabled = true;
  std::string dir;                ///< "" = <model_home>/sessions
  int64_t retention_days = 30;    ///< 0 = keep forever
  int64_t max_megabytes = 10240;  ///< 0 = unlimited
};

struct finetune_config {
  bool enabled = false;
  double learning_rate = 1e-4;
  int64_t steps_per_round = 200;
  double gate_margin = 0.01;  ///< publish only if val metric >= current - margin
  std::string gate_metric = "val_loss";  ///< val_loss | ranking | both (docs/finetune.md)
  int64_t batch = 4;                     ///< examples per training step
  double replay_ratio = 0.5;             ///< share of every batch from the replay buffer
  std::string replay_manifests;          ///< comma-separated original training manifests
  std::string val_manifest;              ///< comma-separated held-out manifests (split val/test rows)
  int64_t max_val = 0;                   ///< held-out utterances used by the gate; 0 = all
  int64_t max_response_tokens = 32;      ///< teacher answer cap (as the projector was trained)
  int64_t threads = 1;                   ///< LibTorch threads of a round
  int64_t nice = 19;                     ///< nice of a round's threads (0 = unchanged)
  int64_t interval_s = 3600;             ///< seconds between automatic rounds; 0 = on demand only
  int64_t min_new_turns = 20;            ///< new annotated turns needed for a round
  int64_t pause_while_sessions = 1;      ///< training waits while >= this many sessions are open (0 = never)
  std::string out_dir;                   ///< rounds; "" = <model_home>/finetune
  std::string cache_dir;                 ///< teacher answers + features; "" = <model_home>/train-cache
};

/// The whole configuration. Defaults are the embedded default server.
struct undertone_config {
  general_config general;
  llm_config llm;
  sampling_config sampling;
  encoder_config encoder;
  vad_config vad;
  server_config server;
  store_config store;
  finetune_config finetune;
};

/// Reads a TOML file over the defaults. Throws config_error (missing file,
/// syntax error with line, unknown key, wrong type, out-of-range value).
undertone_config load_file(const std::string& path);

/// Parses TOML text over the defaults; `source` names it in errors.
undertone_config load_string(const std::string& toml_text, const std::string& source = "<string>");

/// Applies one `section.key=value` override; the value is parsed as the key's
/// type (strings need no quotes). Throws config_error.
void apply_override(undertone_config& cfg, const std::string& assignment);

/// Checks every range and enum; throws config_error on the first problem.
void validate(const undertone_config& cfg);

/// The effective configuration as TOML (round-trips through load_string).
std::string to_toml(const undertone_config& cfg);

/// Every known key ("section.key"), in declaration order.
std::vector<std::string> known_keys();

/// The model cache directory: general.model_home, else $UNDERTONE_HOME, else
/// $HOME/.cache/undertone.
std::string resolve_model_home(const undertone_config& cfg);

}  // namespace undertone::config
