// The socket-owning I/O thread behind the gateway (transport/gateway.hpp) and
// the worker hub (transport/worker_link.hpp): ZeroMQ sockets are not
// thread-safe, so one thread owns a ROUTER and the actors never touch it.
//
//   any thread --post(identity, parts)--> wake_queue --eventfd--> I/O thread --> ROUTER
//   ROUTER --> I/O thread --on_frame / on_oversize / on_disconnect callbacks--> (actor mailbox)
//
// The thread polls the ROUTER together with the queue's eventfd (so queued
// outgoing frames wake it at once) and, if asked, the socket monitor's
// DISCONNECTED events. Incoming frames are split into the routing id and the
// remaining parts and handed to callbacks on the I/O thread; the callbacks
// must not block (they post to an actor). Optional flow control: at most
// `max_inflight` frames handed over and not yet consumed(); beyond that the
// thread stops reading, so ZeroMQ's queues (HWM) push back on the senders.
//
// wake_queue and send_parts are also used by the worker's DEALER thread
// (worker_link), whose loop adds timers and reconnection.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <zmq.hpp>

namespace undertone::transport {

/// A mutex-guarded queue of outgoing frames plus an eventfd that an I/O
/// thread polls: post() from any thread, take() on the I/O thread.
class wake_queue {
 public:
  struct item {
    std::string identity;  ///< ROUTER: the peer's routing id; DEALER: unused
    std::vector<std::string> parts;
  };
  /// `owner` names the component in the error if eventfd() fails.
  explicit wake_queue(const std::string& owner);
  ~wake_queue();
  wake_queue(const wake_queue&) = delete;
  wake_queue& operator=(const wake_queue&) = delete;

  /// The eventfd: readable while something was posted or wake() called.
  int fd() const { return fd_; }
  /// Queues a frame and wakes the I/O thread (never blocks on the network).
  void post(std::string identity, std::vector<std::string> parts);
  /// Makes fd() readable (e.g. to notice a stop flag).
  void wake();
  /// Clears the eventfd and takes everything queued.
  std::deque<item> take();

 private:
  int fd_ = -1;
  std::mutex mu_;
  std::deque<item> q_;
};

/// Sends one frame without blocking: `identity` first when non-null (ROUTER).
/// A peer that is gone or not keeping up loses the frame (errors are
/// swallowed: without ROUTER_MANDATORY there is nothing else to do).
void send_parts(zmq::socket_t& s, const std::vector<std::string>& parts, const std::string* identity);

struct router_loop_options {
  std::string endpoint;             ///< bind here; port "*" = ephemeral
  std::string name = "router";      ///< "gateway", "worker hub": in errors
  std::string config_key;           ///< e.g. "server.bind": named in the bind error
  int linger_ms = 0;                ///< on close: how long queued frames may still leave
  int64_t max_message_bytes = -1;   ///< ZMQ_MAXMSGSIZE: a bigger message drops the peer (-1 = none)
  int hwm = 10000;                  ///< send and receive high-water marks
  /// Frames whose parts (without the routing id) exceed this go to
  /// on_oversize instead of on_frame, uncopied (0 = no check).
  size_t max_frame_bytes = 0;
  int64_t max_inflight = 0;         ///< flow control (see above); 0 = none
  bool watch_disconnects = false;   ///< report closed connections (on_disconnect)
  bool flush_on_stop = false;       ///< send what is queued before closing the socket
};

struct router_loop_callbacks {
  /// A frame: the peer's routing id and the other parts.
  std::function<void(std::string identity, std::vector<std::string> parts)> on_frame;
  /// A frame over max_frame_bytes (counts as in flight like a frame).
  std::function<void(std::string identity, uint64_t bytes)> on_oversize;
  /// The connection a peer's frames came in on closed (watch_disconnects).
  std::function<void(std::string identity)> on_disconnect;
};

class router_loop {
 public:
  /// Binds the ROUTER (throws std::runtime_error naming the endpoint and
  /// `config_key` if that fails). The thread starts with start().
  explicit router_loop(router_loop_options o);
  ~router_loop();  ///< stop()
  router_loop(const router_loop&) = delete;
  router_loop& operator=(const router_loop&) = delete;

  /// The endpoint actually bound (resolves port "*").
  const std::string& endpoint() const { return endpoint_; }
  /// Starts the I/O thread; the callbacks run on it.
  void start(router_loop_callbacks cb);
  /// Queues a frame for a peer (any thread).
  void post(std::string identity, std::vector<std::string> parts) { out_.post(std::move(identity), std::move(parts)); }
  /// One frame handed over has been handled (flow control; any thread).
  void consumed() { inflight_.fetch_sub(1); }
  /// Stops and joins the thread, which closes the socket. Idempotent.
  void stop();

 private:
  void run();
  void flush();
  void receive_some();
  void monitor_events();

  router_loop_options o_;
  router_loop_callbacks cb_;
  zmq::context_t ctx_;
  zmq::socket_t router_, monitor_;
  bool monitoring_ = false;
  std::string endpoint_;
  wake_queue out_;
  std::unordered_map<int, std::string> peer_of_fd_;  ///< connection fd -> routing id (watch_disconnects)
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> inflight_{0};
};

}  // namespace undertone::transport
