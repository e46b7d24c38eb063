// `undertone talk`: talk to a running `undertone serve` through the microphone
// (RtAudio). 20 ms chunks of 16-bit audio go to the server; the server's VAD
// ends turns; answers are printed as they stream. Ctrl-C says bye.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <deque>
#include <iostream>
#include <mutex>

#include <rtaudio/RtAudio.h>

#include "apps/common.hpp"
#include "transport/auth.hpp"
#include "transport/client.hpp"

namespace undertone::apps {

namespace {

struct talk_flags {
  std::string server;
  int64_t device = -1;  // index from --list-devices; -1 = the default input
  bool list_devices = false;
  double connect_timeout_s = 10;
  std::string token;  // --token
};

std::atomic<bool> g_stop{false};
extern "C" void on_sigint(int) { g_stop.store(true); }

/// libasound and JACK print their probing failures straight to stderr; on a
/// machine without sound hardware that is a screenful before our one line.
class quiet_stderr {
 public:
  explicit quiet_stderr(bool enabled) {
    if (!enabled) return;
    std::fflush(stderr);
    saved_ = ::dup(2);
    const int null = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (saved_ >= 0 && null >= 0) ::dup2(null, 2);
    if (null >= 0) ::close(null);
  }
  ~quiet_stderr() {
    if (saved_ < 0) return;
    std::fflush(stderr);
    ::dup2(saved_, 2);
    ::close(saved_);
  }
  quiet_stderr(const quiet_stderr&) = delete;
  quiet_stderr& operator=(const quiet_stderr&) = delete;

 private:
  int saved_ = -1;
};

struct input_device {
  RtAudio::Api api;
  unsigned int id;
  std::string name;
  unsigned int channels;
  unsigned int preferred_rate;
  std::vector<unsigned int> rates;
  bool is_default;
};

/// Every input device of every compiled API; never throws.
std::vector<input_device> list_inputs(std::vector<std::string>& api_names) {
  std::vector<input_device> out;
  std::vector<RtAudio::Api> apis;
  RtAudio::getCompiledApi(apis);
  for (auto api : apis) {
    if (api == RtAudio::RTAUDIO_DUMMY) continue;
    api_names.push_back(RtAudio::getApiName(api));
    try {
      RtAudio a(api);
      a.showWarnings(false);
      const unsigned int n = a.getDeviceCount();
      for (unsigned int i = 0; i < n; ++i) {
        try {
          const auto info = a.getDeviceInfo(i);
          if (!info.probed || info.inputChannels == 0) continue;
          out.push_back({api, i, info.name, info.inputChannels, info.preferredSampleRate, info.sampleRates,
                         info.isDefaultInput});
        } catch (const std::exception&) {
          // A device that cannot be probed is not usable either.
        }
      }
    } catch (const std::exception&) {
      // This API is compiled in but not available here.
    }
  }
  return out;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s.empty() ? "none" : s;
}

/// Audio callback -> main thread: 16-bit mono samples.
struct capture_queue {
  std::mutex mu;
  std::deque<int16_t> samples;
  std::atomic<uint64_t> overflows{0};
};

int on_audio(void*, void* input, unsigned int frames, double, RtAudioStreamStatus status, void* user) {
  auto* q = static_cast<capture_queue*>(user);
  if (status & RTAUDIO_INPUT_OVERFLOW) q->overflows++;
  const auto* in = static_cast<const int16_t*>(input);
  std::lock_guard<std::mutex> lock(q->mu);
  q->samples.insert(q->samples.end(), in, in + frames);
  // Bound the backlog (10 s) if the network stalls.
  while (q->samples.size() > 160000) q->samples.pop_front();
  return 0;
}

int talk(const talk_flags& fl, const config::undertone_config& cfg) {
  const bool debug = cfg.general.log_level == "debug" || cfg.general.log_level == "trace";
  std::vector<std::string> api_names;
  std::vector<input_device> devices;
  {
    quiet_stderr q(!debug);
    devices = list_inputs(api_names);
  }
  if (devices.empty()) {
    std::cerr << "error: no audio input device found (RtAudio APIs: " << join(api_names)
              << "); use `undertone send FILE` instead\n";
    return 1;
  }
  if (fl.list_devices) {
    for (size_t i = 0; i < devices.size(); ++i) {
      const auto& d = devices[i];
      std::printf("%zu: [%s] %s (%u input channels, %u Hz preferred)%s\n", i, RtAudio::getApiName(d.api).c_str(),
                  d.name.c_str(), d.channels, d.preferred_rate, d.is_default ? " (default)" : "");
    }
    return 0;
  }
  size_t pick = 0;
  if (fl.device >= 0) {
    if (size_t(fl.device) >= devices.size()) {
      std::cerr << "error: --device " << fl.device << " does not exist (" << devices.size()
                << " input devices; see --list-devices)\n";
      return 2;
    }
    pick = size_t(fl.device);
  } else {
    for (size_t i = 0; i < devices.size(); ++i)
      if (devices[i].is_default) {
        pick = i;
        break;
      }
  }
  const auto& dev = devices[pick];
  // 16 kHz when the device offers it (no resampling anywhere); otherwise the
  // device's rate and the server resamples.
  unsigned int rate = 16000;
  if (!dev.rates.empty() && std::find(dev.rates.begin(), dev.rates.end(), 16000u) == dev.rates.end())
    rate = dev.preferred_rate ? dev.preferred_rate : dev.rates.back();
  const size_t chunk = rate / 50;  // 20 ms

  transport::client c;
  const std::string server = fl.server.empty() ? connectable_endpoint(cfg.server.bind) : fl.server;
  try {
    const auto w = c.connect(server, "undertone-talk", std::chrono::milliseconds(int64_t(fl.connect_timeout_s * 1000)),
                             transport::client_auth_token(fl.token, cfg.server));
    std::cerr << "connected: session " << w.session << (w.models.empty() ? "" : " (" + w.models + ")") << "\n";
    transport::config_msg cm;
    cm.vad = true;
    c.send_config(cm);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }

  capture_queue q;
  RtAudio audio(dev.api);
  audio.showWarnings(debug);
  try {
    quiet_stderr qs(!debug);
    RtAudio::StreamParameters in;
    in.deviceId = dev.id;
    in.nChannels = 1;
    unsigned int frames = unsigned(chunk);
    audio.openStream(nullptr, &in, RTAUDIO_SINT16, rate, &frames, &on_audio, &q);
    audio.startStream();
  } catch (const std::exception& e) {
    std::cerr << "error: cannot open audio input '" << dev.name << "' (" << RtAudio::getApiName(dev.api)
              << "): " << e.what() << "; use `undertone send FILE` instead\n";
    c.bye();
    return 1;
  }
  std::cerr << "listening on '" << dev.name << "' at " << rate << " Hz; speak, pause to end a turn; Ctrl-C quits\n";

  auto old = std::signal(SIGINT, on_sigint);
  bool answering = false;
  int rc = 0;
  std::vector<int16_t> buf(chunk);
  try {
    while (!g_stop.load()) {
      for (;;) {
        {
          std::lock_guard<std::mutex> lock(q.mu);
          if (q.samples.size() < chunk) break;
          std::copy(q.samples.begin(), q.samples.begin() + long(chunk), buf.begin());
          q.samples.erase(q.samples.begin(), q.samples.begin() + long(chunk));
        }
        c.send_audio(buf.data(), buf.size(), int32_t(rate), 1);
      }
      auto m = c.receive(std::chrono::milliseconds(10));
      if (!m) continue;
      if (auto* d = std::get_if<transport::delta_msg>(&*m)) {
        if (!answering) std::cout << "> ";
        answering = true;
        std::cout << d->text << std::flush;
      } else if (auto* t = std::get_if<transport::turn_end_msg>(&*m)) {
        if (!answering && !t->text.empty()) std::cout << "> " << t->text;
        std::cout << "\n";
        if (t->timings.end_of_turn_to_first_token_ms >= 0)
          std::cerr << "  (first token " << int(t->timings.end_of_turn_to_first_token_ms) << " ms after end of turn)\n";
        answering = false;
      } else if (auto* e = std::get_if<transport::error_msg>(&*m)) {
        std::cerr << "server " << (e->fatal ? "error" : "warning") << ": " << transport::error_name(e->code) << ": "
                  << e->message << "\n";
        if (e->fatal) {
          rc = 1;
          break;
        }
      } else if (auto* ev = std::get_if<transport::event_msg>(&*m)) {
        if (ev->name == "emotion") std::cerr << "  (you sound " << ev->label << ")\n";
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    rc = 1;
  }
  std::signal(SIGINT, old);
  try {
    if (audio.isStreamRunning()) audio.stopStream();
    if (audio.isStreamOpen()) audio.closeStream();
  } catch (const std::exception&) {
    // Shutting down anyway.
  }
  c.bye();
  if (q.overflows.load() > 0) std::cerr << "note: " << q.overflows.load() << " input overflows\n";
  return rc;
}

}  // namespace

void add_talk_command(CLI::App& app, global_options& g) {
  static talk_flags fl;
  auto* cmd = app.add_subcommand(
      "talk",
      "Talk to a running `undertone serve` through the microphone (RtAudio): 20 ms chunks of 16-bit audio\n"
      "stream to the server, whose VAD ends each turn; answers are printed as they stream. Ctrl-C quits.\n"
      "Without an audio input device, use `undertone send FILE` instead.");
  cmd->add_option("--server", fl.server, "server endpoint (default: server.bind of the config)");
  cmd->add_option("--device", fl.device, "input device index from --list-devices (default: the default input)");
  cmd->add_flag("--list-devices", fl.list_devices, "list audio input devices and exit");
  cmd->add_option("--timeout-s", fl.connect_timeout_s, "wait this long for the server's welcome")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  add_token_option(cmd, fl.token);
  cmd->callback([&g] { exit_code() = talk(fl, effective_config(g)); });
}

}  // namespace undertone::apps
