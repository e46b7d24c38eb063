// The ROUTER-owning I/O thread (design in router_loop.hpp).
#include "transport/router_loop.hpp"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>
#include <stdexcept>

#include <zmq_addon.hpp>

namespace undertone::transport {

// ------------------------------------------------------------ wake_queue ----
wake_queue::wake_queue(const std::string& owner) {
  fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd_ < 0) throw std::runtime_error(owner + ": eventfd failed: " + std::strerror(errno));
}

wake_queue::~wake_queue() {
  if (fd_ >= 0) ::close(fd_);
}

void wake_queue::post(std::string identity, std::vector<std::string> parts) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    q_.push_back({std::move(identity), std::move(parts)});
  }
  wake();
}

void wake_queue::wake() {
  const uint64_t one = 1;
  // EAGAIN means the counter is already non-zero: the thread wakes anyway.
  [[maybe_unused]] auto n = ::write(fd_, &one, sizeof one);
}

std::deque<wake_queue::item> wake_queue::take() {
  uint64_t n = 0;
  [[maybe_unused]] auto r = ::read(fd_, &n, sizeof n);
  std::deque<item> out;
  std::lock_guard<std::mutex> lock(mu_);
  out.swap(q_);
  return out;
}

void send_parts(zmq::socket_t& s, const std::vector<std::string>& parts, const std::string* identity) {
  // dontwait: a peer that is gone or not keeping up loses the frame instead of
  // blocking the thread.
  try {
    if (identity) s.send(zmq::buffer(*identity), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
    for (size_t i = 0; i < parts.size(); ++i)
      s.send(zmq::buffer(parts[i]), i + 1 < parts.size() ? zmq::send_flags::sndmore | zmq::send_flags::dontwait
                                                         : zmq::send_flags::dontwait);
  } catch (const zmq::error_t&) {
    // EHOSTUNREACH cannot happen without ROUTER_MANDATORY; anything else is a
    // peer we cannot reach: dropping the frame is the only option.
  }
}

// ----------------------------------------------------------- router_loop ----
router_loop::router_loop(router_loop_options o)
    : o_(std::move(o)),
      ctx_(1),
      router_(ctx_, zmq::socket_type::router),
      monitor_(ctx_, zmq::socket_type::pair),
      out_(o_.name) {
  router_.set(zmq::sockopt::linger, o_.linger_ms);
  if (o_.max_message_bytes >= 0) router_.set(zmq::sockopt::maxmsgsize, o_.max_message_bytes);
  router_.set(zmq::sockopt::sndhwm, o_.hwm);
  router_.set(zmq::sockopt::rcvhwm, o_.hwm);
  try {
    router_.bind(o_.endpoint);
  } catch (const zmq::error_t& e) {
    throw std::runtime_error(o_.name + ": cannot bind " + o_.endpoint + " (" + e.what() + ")" +
                             (o_.config_key.empty() ? std::string() : "; set " + o_.config_key + " to a free endpoint"));
  }
  endpoint_ = router_.get(zmq::sockopt::last_endpoint);
  if (o_.watch_disconnects) {
    // A peer killed outright sends nothing, but its TCP connection closes. The
    // ROUTER does not say whose (ZMQ_ROUTER_NOTIFY is a draft option Debian's
    // libzmq lacks), so the thread remembers the file descriptor each peer's
    // frames came in on (ZMQ_SRCFD) and maps the monitor's DISCONNECTED
    // events, which carry that descriptor, back to the peer.
    const std::string mon = "inproc://undertone-router-monitor";
    if (zmq_socket_monitor(router_.handle(), mon.c_str(), ZMQ_EVENT_DISCONNECTED) == 0) {
      monitor_.set(zmq::sockopt::linger, 0);
      monitor_.connect(mon);
      monitoring_ = true;
    }
  }
}

router_loop::~router_loop() { stop(); }

void router_loop::start(router_loop_callbacks cb) {
  cb_ = std::move(cb);
  thread_ = std::thread([this] { run(); });
}

void router_loop::stop() {
  if (!thread_.joinable()) return;
  stopping_.store(true);
  out_.wake();
  thread_.join();
}

void router_loop::flush() {
  for (auto& f : out_.take()) send_parts(router_, f.parts, &f.identity);
}

void router_loop::run() {
  zmq::pollitem_t items[3] = {{router_.handle(), 0, ZMQ_POLLIN, 0},
                              {nullptr, out_.fd(), ZMQ_POLLIN, 0},
                              {monitor_.handle(), 0, short(monitoring_ ? ZMQ_POLLIN : 0), 0}};
  const int n_items = monitoring_ ? 3 : 2;
  while (!stopping_.load()) {
    // Flow control: while the consumer has max_inflight frames to work
    // through, stop reading (and look again every 5 ms).
    const bool can_read = o_.max_inflight <= 0 || inflight_.load() < o_.max_inflight;
    items[0].events = can_read ? ZMQ_POLLIN : 0;
    items[0].revents = 0;
    try {
      zmq::poll(items, n_items, std::chrono::milliseconds(can_read ? -1 : 5));
    } catch (const zmq::error_t& e) {
      if (e.num() == EINTR) continue;
      break;
    }
    if (items[1].revents & ZMQ_POLLIN) flush();
    if (items[0].revents & ZMQ_POLLIN) receive_some();
    if (n_items == 3 && (items[2].revents & ZMQ_POLLIN)) monitor_events();
  }
  if (o_.flush_on_stop) flush();
  if (monitoring_) {
    zmq_socket_monitor(router_.handle(), nullptr, 0);
    monitor_.close();
  }
  router_.close();  // with linger_ms: what was flushed may still leave
}

void router_loop::receive_some() {
  // Bounded so outgoing frames are not starved by a flood.
  for (int i = 0; i < 256 && (o_.max_inflight <= 0 || inflight_.load() < o_.max_inflight); ++i) {
    std::vector<zmq::message_t> msgs;
    std::optional<size_t> got;
    try {
      got = zmq::recv_multipart(router_, std::back_inserter(msgs), zmq::recv_flags::dontwait);
    } catch (const zmq::error_t&) {
      return;
    }
    if (!got) return;
    if (msgs.empty()) continue;
    std::string identity = msgs[0].to_string();
    if (monitoring_ && msgs.size() > 1) {
      const int fd = msgs[1].get(ZMQ_SRCFD);
      if (fd >= 0) peer_of_fd_[fd] = identity;
    }
    inflight_.fetch_add(1);
    if (o_.max_frame_bytes > 0) {
      size_t total = 0;
      for (size_t k = 1; k < msgs.size(); ++k) total += msgs[k].size();
      if (total > o_.max_frame_bytes) {
        if (cb_.on_oversize) cb_.on_oversize(std::move(identity), uint64_t(total));
        continue;
      }
    }
    std::vector<std::string> parts;
    parts.reserve(msgs.size() - 1);
    for (size_t k = 1; k < msgs.size(); ++k) parts.push_back(msgs[k].to_string());
    if (cb_.on_frame) cb_.on_frame(std::move(identity), std::move(parts));
  }
}

void router_loop::monitor_events() {
  for (int i = 0; i < 64; ++i) {
    std::vector<zmq::message_t> ev;
    std::optional<size_t> got;
    try {
      got = zmq::recv_multipart(monitor_, std::back_inserter(ev), zmq::recv_flags::dontwait);
    } catch (const zmq::error_t&) {
      return;
    }
    if (!got) return;
    if (ev.empty() || ev[0].size() < 6) continue;
    uint16_t event = 0;
    uint32_t value = 0;
    std::memcpy(&event, ev[0].data(), 2);
    std::memcpy(&value, static_cast<const char*>(ev[0].data()) + 2, 4);
    if (event != ZMQ_EVENT_DISCONNECTED) continue;
    auto it = peer_of_fd_.find(int(value));
    if (it == peer_of_fd_.end()) continue;
    if (cb_.on_disconnect) cb_.on_disconnect(it->second);
    peer_of_fd_.erase(it);
  }
}

}  // namespace undertone::transport
