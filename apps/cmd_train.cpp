// `undertone train`: behavioral alignment of the speech encoder + projector to
// the frozen LLM (docs/training.md). The work is done by models/nn/alignment.hpp;
// this file maps flags and config onto it and prints what happens.
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <random>

#include <spdlog/spdlog.h>

#include "apps/common.hpp"
#include "models/manifest.hpp"
#include "models/model_store.hpp"
#include "models/nn/alignment.hpp"
#include "models/runtime.hpp"
#include "models/train_metrics.hpp"

namespace undertone::apps {

namespace {

namespace fs = std::filesystem;

struct train_flags {
  std::vector<std::string> manifests;
  std::string stage = "emotion";
  std::string out = "train-out";
  std::string cache_dir;
  int64_t steps = 1000, batch = 4, accum = 1, warmup = 50;
  double lr = 1e-3, min_lr_ratio = 0.1, weight_decay = 0.01, clip = 1.0, semantic_fraction = 0.3;
  double ce_weight = 1.0, kl_weight = 0.0, kl_temperature = 1.0;
  int64_t val_every = 100, val_examples = 64, ckpt_every = 100, keep = 2;
  int64_t encoder_layers = 0, projector_hidden = 1024;
  int64_t max_response_tokens = 48, teacher_batch = 16;
  int64_t max_train = 0, max_val = 0;
  std::string init;
  std::string emotions = "four";
  bool calm_as_neutral = false, bf16 = false, resume = false, plot_only = false, no_plot = false;
  std::string teacher_dtype = "fp32";
  uint64_t seed = 1;
  std::string progress = "auto";
};

torch::Dtype dtype_of(const std::string& s) {
  if (s == "fp32") return torch::kFloat32;
  if (s == "bf16") return torch::kBFloat16;
  if (s == "fp16") return torch::kFloat16;
  throw std::invalid_argument("dtype '" + s + "' is not fp32, bf16 or fp16");
}

std::vector<models::utterance> subset(std::vector<models::utterance> v, int64_t n, uint64_t seed) {
  if (n <= 0 || int64_t(v.size()) <= n) return v;
  std::mt19937_64 rng(seed ^ 0x5eedULL);
  for (size_t i = v.size() - 1; i > 0; --i) std::swap(v[i], v[size_t(rng() % (i + 1))]);
  v.resize(size_t(n));
  return v;
}

int run_train(const train_flags& f, const global_options& g) {
  using clock = std::chrono::steady_clock;
  namespace M = models;
  if (f.plot_only) {
    auto err = M::plot_loss_curves((fs::path(f.out) / "metrics.jsonl").string(), (fs::path(f.out) / "loss.png").string());
    if (!err.empty()) {
      std::cerr << "error: " << err << "\n";
      return 1;
    }
    std::cout << "wrote " << (fs::path(f.out) / "loss.png").string() << "\n";
    return 0;
  }
  if (f.manifests.empty()) {
    std::cerr << "error: --manifest is required (build one with `undertone data ravdess --out FILE`)\n";
    return 2;
  }
  if (!f.resume && fs::exists(fs::path(f.out) / "latest")) {
    std::cerr << "error: " << f.out << " already holds a training run; pass --resume to continue it or choose another --out\n";
    return 2;
  }
  auto cfg = effective_config(g);
  M::set_compute_threads(int(cfg.general.threads));
  const std::string home = config::resolve_model_home(cfg);
  const std::string cache_dir = f.cache_dir.empty() ? home + "/train-cache" : f.cache_dir;
  const auto stage = M::parse_alignment_stage(f.stage);

  // ---- data
  std::vector<M::utterance> all;
  for (const auto& m : f.manifests) {
    auto rows = M::read_manifest(m);
    all.insert(all.end(), rows.begin(), rows.end());
  }
  M::check_speaker_disjoint(all);
  std::vector<M::utterance> train, val;
  for (auto& u : all) {
    if (f.calm_as_neutral && u.emotion == M::emotion_label::calm) u.emotion = M::emotion_label::neutral;
    if (u.split == M::split_kind::train) train.push_back(u);
    else if (u.split == M::split_kind::val) val.push_back(u);
  }
  train = subset(std::move(train), f.max_train, f.seed);
  val = subset(std::move(val), f.max_val, f.seed);
  std::function<bool(M::emotion_label)> use_label;
  if (f.emotions == "four")
    use_label = [](M::emotion_label e) { return M::four_class_index(e) >= 0; };
  else if (f.emotions == "all")
    use_label = [](M::emotion_label) { return true; };
  else
    throw std::invalid_argument("--emotions must be four or all");
  std::cout << "data: " << train.size() << " train / " << val.size() << " val utterances from "
            << f.manifests.size() << " manifest(s)\n";

  // ---- LLM (frozen) and teacher targets
  M::llama_options lo;
  lo.device = torch::Device(cfg.llm.device);
  // The trainer's precision is chosen by --bf16 (the recipe's flag), not by
  // llm.dtype = auto: an fp32 run stays fp32 unless asked.
  lo.dtype = f.bf16 ? torch::kBFloat16 : dtype_of(cfg.llm.dtype == "auto" ? "fp32" : cfg.llm.dtype);
  const std::string llm_path = M::resolve_model_path(home, cfg.llm.model);
  auto t0 = clock::now();
  auto llm = M::alignment_llm::load(llm_path, lo, cfg.llm.chat_template);
  std::cout << "LLM: " << llm_path << " (" << c10::toString(lo.dtype) << " on " << lo.device << ", loaded in "
            << std::chrono::duration<double>(clock::now() - t0).count() << " s)\n";
  std::optional<M::alignment_llm> teacher_llm;
  const M::alignment_llm* teacher = &llm;
  if (dtype_of(f.teacher_dtype) != lo.dtype) {
    M::llama_options to = lo;
    to.dtype = dtype_of(f.teacher_dtype);
    teacher_llm = M::alignment_llm::load(llm_path, to, cfg.llm.chat_template);
    teacher = &*teacher_llm;
  }
  M::teacher_options topt;
  topt.max_tokens = f.max_response_tokens;
  topt.batch = f.teacher_batch;
  M::teacher_cache tcache(cache_dir, llm.identity + "|" + f.teacher_dtype, topt.max_tokens);
  const auto tasks = M::stage_tasks(stage);
  auto make = [&](const std::vector<M::utterance>& utts, std::vector<M::alignment_task> ts, const char* what) {
    M::teacher_stats st;
    M::progress_bar bar(std::string("teacher ") + what);
    auto ex = M::build_examples(*teacher, tcache, utts, ts, use_label, topt, &st,
                                [&](size_t d, size_t n) { bar.update(int64_t(d), int64_t(n), 0, ""); });
    bar.finish();
    std::cout << "teacher (" << what << "): " << st.requests << " requests, " << st.hits << " cached, "
              << st.generated << " generated";
    if (st.generated)
      std::cout << " (" << st.tokens << " tokens in " << st.seconds << " s = " << double(st.tokens) / st.seconds
                << " tok/s, " << double(st.generated) / st.seconds << " answers/s)";
    std::cout << "\n";
    return ex;
  };
  std::vector<M::alignment_example> sem, emo, val_ex;
  if (stage != M::alignment_stage::emotion) sem = make(train, {M::alignment_task::semantic}, "stage 1");
  if (stage != M::alignment_stage::semantic)
    emo = make(train, {M::alignment_task::emotion, M::alignment_task::emotion_question}, "stage 2");
  val_ex = make(val, stage == M::alignment_stage::semantic ? tasks : M::stage_tasks(M::alignment_stage::emotion),
                "val");
  teacher_llm.reset();
  std::cout << "examples: " << sem.size() << " semantic, " << emo.size() << " emotion+aux, " << val_ex.size()
            << " val\n";
  if (!emo.empty()) {
    const auto& e = emo.front();
    std::cout << "  e.g. [" << M::to_string(e.task) << ", " << M::to_string(train[e.utt].emotion) << "] \""
              << train[e.utt].transcript << "\" -> \"" << llm.tok->decode(e.response) << "\"\n";
  }

  // ---- encoder, features, projector
  M::whisper_encoder_options eo;
  eo.device = torch::Device(cfg.encoder.device);
  eo.dtype = torch::kFloat32;  // trainables and cached outputs in fp32
  eo.chunk_ms = cfg.encoder.chunk_ms;
  eo.context_blocks = cfg.encoder.window_blocks > 0 ? cfg.encoder.window_blocks : -1;
  const std::string enc_path = M::resolve_model_path(home, cfg.encoder.model);
  auto enc = M::whisper_encoder::load(enc_path, eo);
  enc->set_trainable_layers(f.encoder_layers);
  M::mel_config mc;
  mc.n_mels = int(enc->hparams().n_mels);
  mc.normalization = M::parse_mel_normalization(cfg.encoder.normalization);
  const bool enc_out = f.encoder_layers == 0;
  const std::string enc_id = M::llm_identity(enc_path);
  M::feature_store ftrain(cache_dir, mc, enc, enc_id, enc_out), fval(cache_dir, mc, enc, enc_id, enc_out);
  {
    auto tf = clock::now();
    M::progress_bar bar(enc_out ? "features (encoder outputs)" : "features (log-mel)");
    ftrain.prepare(train, [&](size_t d, size_t n) { bar.update(int64_t(d), int64_t(n), 0, ""); });
    fval.prepare(val);
    bar.finish();
    std::cout << "features: " << ftrain.cache_hits() + fval.cache_hits() << " of " << train.size() + val.size()
              << " cached, " << std::chrono::duration<double>(clock::now() - tf).count() << " s\n";
  }
  M::projector_config pc;
  pc.stack = cfg.encoder.stack_frames;
  pc.d_in = enc->output_dim();
  pc.d_hidden = f.projector_hidden;
  pc.d_out = llm.model->d_model();
  auto proj = std::make_shared<M::projector>(pc, eo.device, torch::kFloat32, f.seed);
  if (!f.init.empty()) {
    proj->load_weights(f.init);
    std::cout << "projector initialised from " << f.init << "\n";
  }
  M::speech_model sm;
  sm.encoder = enc;
  sm.proj = proj;
  sm.trainable_encoder_layers = f.encoder_layers;

  // ---- train
  M::train_options o;
  o.stage = stage;
  o.steps = f.steps;
  o.batch = f.batch;
  o.accum = f.accum;
  o.lr = f.lr;
  o.min_lr_ratio = f.min_lr_ratio;
  o.warmup = f.warmup;
  o.weight_decay = f.weight_decay;
  o.clip = f.clip;
  o.semantic_fraction = f.semantic_fraction;
  o.loss.ce_weight = f.ce_weight;
  o.loss.kl_weight = f.kl_weight;
  o.loss.kl_temperature = f.kl_temperature;
  o.val_every = f.val_every;
  o.val_examples = f.val_examples;
  o.ckpt_every = f.ckpt_every;
  o.keep_checkpoints = f.keep;
  o.seed = f.seed;
  o.out_dir = f.out;
  o.plot = !f.no_plot;
  o.progress_tty = f.progress == "bar" ? 1 : f.progress == "lines" ? 0 : -1;
  M::alignment_trainer tr(llm, sm, ftrain, &fval, std::move(sem), std::move(emo), std::move(val_ex), o);
  if (f.resume) {
    int64_t s = tr.resume();
    std::cout << (s ? "resumed at step " + std::to_string(s) : std::string("nothing to resume; starting at step 0"))
              << "\n";
  }
  nlohmann::json run = {{"options", o.to_string()},
                        {"llm", llm_path},
                        {"llm_identity", llm.identity},
                        {"llm_dtype", c10::toString(lo.dtype)},
                        {"encoder", enc_path},
                        {"encoder_layers", f.encoder_layers},
                        {"projector", pc.to_string()},
                        {"manifests", f.manifests},
                        {"train_utterances", train.size()},
                        {"val_utterances", val.size()},
                        {"emotions", f.emotions},
                        {"calm_as_neutral", f.calm_as_neutral},
                        {"template", M::k_alignment_template_version},
                        {"max_response_tokens", f.max_response_tokens},
                        {"torch", M::torch_version()},
                        {"threads", M::torch_parallel_info()}};
  std::ofstream(fs::path(f.out) / "run.json") << run.dump(2) << "\n";
  std::cout << "training: " << o.to_string() << "; " << sm.trainables().size() << " trainable tensors\n";
  auto ts = clock::now();
  const int64_t s0 = tr.step();
  double last = tr.train();
  const double secs = std::chrono::duration<double>(clock::now() - ts).count();
  std::cout << "done: step " << tr.step() << ", last train loss " << last << ", " << secs << " s ("
            << (tr.step() > s0 ? secs / double(tr.step() - s0) : 0.0) << " s/step incl. validation)\n"
            << "weights: " << (fs::path(f.out) / "projector.safetensors").string()
            << (f.encoder_layers ? " + encoder_layers.safetensors" : "") << "; metrics: "
            << (fs::path(f.out) / "metrics.jsonl").string() << "\n";
  return 0;
}

}  // namespace

void add_train_command(CLI::App& app, global_options& g) {
  static train_flags f;
  auto* cmd = app.add_subcommand(
      "train",
      "Behavioral alignment: train the projector (and optionally the top encoder layers) so that the frozen LLM, "
      "given speech tokens, answers as it does when given the transcript with the emotion stated (docs/training.md). "
      "LLM and encoder come from llm.* / encoder.* of the config (device, model).");
  cmd->add_option("-m,--manifest", f.manifests, "JSONL manifest(s) (undertone data ...); split train/val by speaker")
      ->check(CLI::ExistingFile);
  cmd->add_option("--stage", f.stage, "semantic (stage 1), emotion (stage 2 + aux question) or both")
      ->capture_default_str()
      ->check(CLI::IsMember({"semantic", "emotion", "both"}));
  cmd->add_option("-o,--out", f.out, "output directory (checkpoints, metrics.jsonl, loss.png, projector.safetensors)")
      ->capture_default_str();
  cmd->add_option("--steps", f.steps, "optimizer steps")->capture_default_str();
  cmd->add_option("--batch", f.batch, "examples per micro-batch")->capture_default_str();
  cmd->add_option("--accum", f.accum, "micro-batches per step (gradient accumulation)")->capture_default_str();
  cmd->add_option("--lr", f.lr, "peak learning rate (AdamW)")->capture_default_str();
  cmd->add_option("--min-lr-ratio", f.min_lr_ratio, "cosine decays to lr * this")->capture_default_str();
  cmd->add_option("--warmup", f.warmup, "linear warmup steps")->capture_default_str();
  cmd->add_option("--weight-decay", f.weight_decay, "AdamW decoupled weight decay (matrices only)")
      ->capture_default_str();
  cmd->add_option("--clip", f.clip, "gradient norm clip, 0 = off")->capture_default_str();
  cmd->add_option("--semantic-fraction", f.semantic_fraction, "--stage both: share of steps on stage 1 first")
      ->capture_default_str();
  cmd->add_option("--ce-weight", f.ce_weight, "weight of the cross-entropy on the teacher's answer")
      ->capture_default_str();
  cmd->add_option("--kl-weight", f.kl_weight, "weight of KL(teacher logits || student), 0 = off (saves a forward)")
      ->capture_default_str();
  cmd->add_option("--kl-temperature", f.kl_temperature, "temperature tau of the KL term")->capture_default_str();
  cmd->add_option("--encoder-layers", f.encoder_layers,
                  "also train the top N Whisper layers (0: frozen encoder, outputs cached: much faster)")
      ->capture_default_str();
  cmd->add_option("--projector-hidden", f.projector_hidden, "SwiGLU hidden width of a new projector")
      ->capture_default_str();
  cmd->add_option("--init", f.init, "start from this projector checkpoint (e.g. the stage-1 result)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--emotions", f.emotions, "stage 2 labels: four (neutral/happy/sad/angry) or all")
      ->capture_default_str()
      ->check(CLI::IsMember({"four", "all"}));
  cmd->add_flag("--calm-as-neutral", f.calm_as_neutral, "treat RAVDESS calm as neutral");
  cmd->add_option("--max-response-tokens", f.max_response_tokens, "teacher answer cap, tokens")->capture_default_str();
  cmd->add_option("--teacher-batch", f.teacher_batch, "sequences per batched teacher decode step")
      ->capture_default_str();
  cmd->add_option("--teacher-dtype", f.teacher_dtype, "precision of teacher generation (part of the cache key)")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp32", "bf16"}));
  cmd->add_option("--cache-dir", f.cache_dir, "teacher answers + features cache (default <model_home>/train-cache)");
  cmd->add_option("--max-train", f.max_train, "use at most N training utterances (0 = all)")->capture_default_str();
  cmd->add_option("--max-val", f.max_val, "use at most N validation utterances (0 = all)")->capture_default_str();
  cmd->add_option("--val-every", f.val_every, "validate every N steps (0 = at the end)")->capture_default_str();
  cmd->add_option("--val-examples", f.val_examples, "validation examples (fixed subset)")->capture_default_str();
  cmd->add_option("--ckpt-every", f.ckpt_every, "checkpoint every N steps (0 = at the end)")->capture_default_str();
  cmd->add_option("--keep", f.keep, "checkpoints kept")->capture_default_str();
  cmd->add_flag("--bf16", f.bf16, "run the frozen LLM in bf16 (trainables and AdamW stay fp32)");
  cmd->add_flag("--resume", f.resume, "continue the run in --out from its latest checkpoint");
  cmd->add_option("--seed", f.seed, "projector init and data order")->capture_default_str();
  cmd->add_option("--progress", f.progress, "auto, bar or lines")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "bar", "lines"}));
  cmd->add_flag("--no-plot", f.no_plot, "do not draw loss.png at the end");
  cmd->add_flag("--plot", f.plot_only, "only (re)draw --out/loss.png from --out/metrics.jsonl and exit");
  cmd->callback([&g] {
    try {
      exit_code() = run_train(f, g);
    } catch (const std::exception& e) {
      std::cerr << "error: " << e.what() << "\n";
      exit_code() = 1;
    }
  });
}

}  // namespace undertone::apps
