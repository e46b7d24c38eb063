// Session store: SQLite index + FLAC per turn (models/session_store.hpp, docs/store.md).
#include "models/session_store.hpp"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <set>

#include "models/audio.hpp"
#include "models/manifest.hpp"

namespace undertone::models {

namespace {

namespace fs = std::filesystem;

constexpr int k_schema_version = 1;

// Tables (docs/store.md). sessions.first/last_unix_s: first/last turn start.
// turns.audio: path relative to the store, NULL for text turns. text_bytes: the
// row's text, counted by the size limit together with audio_bytes.
const char* const k_schema = R"sql(
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
  id INTEGER PRIMARY KEY,
  run TEXT NOT NULL,
  session INTEGER NOT NULL,
  client TEXT NOT NULL,
  first_unix_s REAL NOT NULL,
  last_unix_s REAL NOT NULL,
  UNIQUE (run, session));
CREATE TABLE IF NOT EXISTS turns (
  id INTEGER PRIMARY KEY,
  session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
  turn INTEGER NOT NULL,
  started_unix_s REAL NOT NULL,
  stored_unix_s REAL NOT NULL,
  audio TEXT,
  audio_samples INTEGER NOT NULL DEFAULT 0,
  audio_bytes INTEGER NOT NULL DEFAULT 0,
  text_bytes INTEGER NOT NULL DEFAULT 0,
  user_text TEXT NOT NULL,
  answer TEXT NOT NULL,
  stop_reason TEXT NOT NULL,
  llm_version TEXT NOT NULL,
  encoder_version TEXT NOT NULL,
  timings TEXT NOT NULL,
  events TEXT NOT NULL,
  UNIQUE (session_id, turn));
CREATE TABLE IF NOT EXISTS annotations (
  id INTEGER PRIMARY KEY,
  turn_id INTEGER NOT NULL REFERENCES turns(id) ON DELETE CASCADE,
  transcript TEXT NOT NULL,
  emotion TEXT NOT NULL,
  source TEXT NOT NULL CHECK (source IN ('client', 'cli')),
  unix_s REAL NOT NULL);
CREATE INDEX IF NOT EXISTS annotations_turn ON annotations(turn_id);
CREATE INDEX IF NOT EXISTS sessions_last ON sessions(last_unix_s);
)sql";

double now_unix() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void fsync_path(const fs::path& p, bool dir) {
  const int fd = ::open(p.c_str(), dir ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd < 0) throw store_error("cannot open " + p.string() + " to fsync: " + std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) throw store_error("fsync of " + p.string() + " failed: " + std::strerror(err));
}

// Run names become directory names: keep them to a safe alphabet.
void check_run_name(const std::string& run) {
  if (run.empty() || run == "." || run == ".." ||
      !std::all_of(run.begin(), run.end(), [](char c) { return std::isalnum((unsigned char)c) || c == '-' || c == '_' || c == '.'; }))
    throw store_error("session store: bad run name '" + run + "' (letters, digits, '-', '_', '.')");
}

/// One prepared statement; columns and parameters 0-based / 1-based as SQLite.
class stmt {
 public:
  stmt(sqlite3* db, const std::string& sql, const std::string& where) : db_(db), where_(where) {
    if (sqlite3_prepare_v2(db, sql.c_str(), int(sql.size()), &s_, nullptr) != SQLITE_OK)
      throw store_error(where_ + ": " + sqlite3_errmsg(db) + " (in: " + sql.substr(0, 80) + ")");
  }
  ~stmt() { sqlite3_finalize(s_); }
  stmt(const stmt&) = delete;
  stmt& operator=(const stmt&) = delete;

  stmt& bind(int i, int64_t v) { return check(sqlite3_bind_int64(s_, i, v)); }
  stmt& bind(int i, double v) { return check(sqlite3_bind_double(s_, i, v)); }
  stmt& bind(int i, const std::string& v) {
    return check(sqlite3_bind_text(s_, i, v.data(), int(v.size()), SQLITE_TRANSIENT));
  }
  stmt& bind_null(int i) { return check(sqlite3_bind_null(s_, i)); }
  /// true: a row is ready; false: done.
  bool step() {
    const int rc = sqlite3_step(s_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    throw store_error(where_ + ": " + sqlite3_errmsg(db_));
  }
  int64_t i64(int c) const { return sqlite3_column_int64(s_, c); }
  double f64(int c) const { return sqlite3_column_double(s_, c); }
  bool null(int c) const { return sqlite3_column_type(s_, c) == SQLITE_NULL; }
  std::string text(int c) const {
    const auto* t = reinterpret_cast<const char*>(sqlite3_column_text(s_, c));
    return t ? std::string(t, size_t(sqlite3_column_bytes(s_, c))) : std::string();
  }

 private:
  stmt& check(int rc) {
    if (rc != SQLITE_OK) throw store_error(where_ + ": " + sqlite3_errmsg(db_));
    return *this;
  }
  sqlite3* db_;
  sqlite3_stmt* s_ = nullptr;
  std::string where_;
};

uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

std::string lower(std::string s) {
  for (auto& c : s) c = char(std::tolower((unsigned char)c));
  return s;
}

// Columns of the turn query, in this order (read_turn).
const char* const k_turn_columns =
    "t.id, s.run, s.session, s.client, t.turn, t.started_unix_s, t.audio, t.audio_samples, t.user_text, "
    "t.answer, t.stop_reason, t.llm_version, t.encoder_version, t.timings, t.events, "
    "(SELECT a.transcript FROM annotations a WHERE a.turn_id = t.id AND a.transcript <> '' ORDER BY a.id DESC LIMIT 1), "
    "(SELECT a.emotion FROM annotations a WHERE a.turn_id = t.id AND a.emotion <> '' ORDER BY a.id DESC LIMIT 1) "
    "FROM turns t JOIN sessions s ON s.id = t.session_id";

}  // namespace

std::string export_speaker(const stored_turn& t) {
  if (!t.client.empty()) return "session:" + t.client;
  return "session:" + t.run + "/" + std::to_string(t.session);
}

std::string export_split(const std::string& speaker, double val_fraction) {
  if (val_fraction <= 0) return "train";
  const double u = double(fnv1a64(speaker) % 10000) / 10000.0;
  return u < val_fraction ? "val" : "train";
}

struct session_store::impl {
  std::string dir, index;
  store_options opt;
  open_report report;
  sqlite3* db = nullptr;
  int lock_fd = -1;

  ~impl() {
    if (db) sqlite3_close_v2(db);
    if (lock_fd >= 0) ::close(lock_fd);
  }

  std::string where() const { return "session store " + index; }

  void exec(const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
      std::string m = err ? err : sqlite3_errmsg(db);
      sqlite3_free(err);
      throw store_error(where() + ": " + m);
    }
  }

  /// RAII transaction: rolled back unless committed.
  struct txn {
    impl* p;
    bool done = false;
    explicit txn(impl* q) : p(q) { p->exec("BEGIN IMMEDIATE"); }
    void commit() {
      p->exec("COMMIT");
      done = true;
    }
    ~txn() {
      if (!done) sqlite3_exec(p->db, "ROLLBACK", nullptr, nullptr, nullptr);
    }
  };

  /// Exclusive writer lock (flock on STORE/writer.lock): held while an audio
  /// file exists without its row (append) and while recovery scans.
  struct writer_lock {
    int fd;
    bool held = false;
    writer_lock(int f, bool block) : fd(f) { held = ::flock(fd, LOCK_EX | (block ? 0 : LOCK_NB)) == 0; }
    ~writer_lock() {
      if (held) ::flock(fd, LOCK_UN);
    }
  };

  void open() {
    const fs::path d(dir), ix(index);
    if (!fs::exists(ix)) {
      if (!opt.create)
        throw store_error("no session store at " + dir + " (" + index +
                          " does not exist): check --store / store.dir, or start `undertone serve` to create it");
      std::error_code ec;
      fs::create_directories(d, ec);
      if (ec) throw store_error("cannot create session store directory " + dir + ": " + ec.message());
    } else if (fs::file_size(ix) > 0) {
      // SQLite only notices a foreign file at the first query; say it plainly.
      char head[16] = {};
      std::ifstream in(ix, std::ios::binary);
      in.read(head, sizeof head);
      if (in.gcount() < 16 || std::memcmp(head, "SQLite format 3", 16) != 0)
        throw store_error("session store index " + index +
                          " is not an SQLite database (overwritten or corrupted): move it away to start an empty "
                          "store (the audio under " + dir + "/audio is then removed as orphaned), or restore it from a backup");
    }
    const int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX;
    if (sqlite3_open_v2(index.c_str(), &db, flags, nullptr) != SQLITE_OK)
      throw store_error("cannot open session store index " + index + ": " +
                        (db ? sqlite3_errmsg(db) : "out of memory"));
    sqlite3_busy_timeout(db, 5000);
    try {
      exec("PRAGMA foreign_keys = ON");
      exec("PRAGMA journal_mode = WAL");
      exec("PRAGMA synchronous = FULL");
      {
        txn t(this);
        exec(k_schema);
        stmt q(db, "SELECT max(version) FROM schema_version", where());
        q.step();
        if (q.null(0)) {
          stmt ins(db, "INSERT INTO schema_version(version) VALUES (?)", where());
          ins.bind(1, int64_t(k_schema_version)).step();
        } else if (q.i64(0) > k_schema_version) {
          throw store_error(where() + " has schema version " + std::to_string(q.i64(0)) +
                            ", newer than this undertone (" + std::to_string(k_schema_version) + "): upgrade undertone");
        }
        t.commit();
      }
    } catch (const store_error& e) {
      throw store_error(std::string(e.what()) +
                        (std::strstr(e.what(), "malformed") || std::strstr(e.what(), "not a database")
                             ? " (the index is corrupted: move it away to start an empty store, or restore a backup)"
                             : ""));
    }
    const fs::path lock = d / "writer.lock";
    lock_fd = ::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lock_fd < 0) throw store_error("cannot open " + lock.string() + ": " + std::strerror(errno));
    if (opt.recover) recover();
  }

  void recover() {
    writer_lock l(lock_fd, false);
    if (!l.held) return;  // a writer is active: its files may be uncommitted
    report.recovered = true;
    std::set<std::string> known;
    {
      stmt q(db, "SELECT audio FROM turns WHERE audio IS NOT NULL", where());
      while (q.step()) known.insert(q.text(0));
    }
    const fs::path root = fs::path(dir) / "audio";
    if (!fs::is_directory(root)) return;
    std::vector<fs::path> files, dirs;
    for (auto it = fs::recursive_directory_iterator(root); it != fs::recursive_directory_iterator(); ++it) {
      if (it->is_directory())
        dirs.push_back(it->path());
      else if (!known.count(fs::relative(it->path(), dir).generic_string()))
        files.push_back(it->path());
    }
    for (auto& f : files) {
      std::error_code ec;
      if (fs::remove(f, ec)) ++report.orphans_removed;
    }
    remove_empty_dirs(dirs);
  }

  static void remove_empty_dirs(std::vector<fs::path> dirs) {
    std::sort(dirs.begin(), dirs.end(), [](const fs::path& a, const fs::path& b) {
      return a.string().size() > b.string().size();  // deepest first
    });
    for (auto& d : dirs) {
      std::error_code ec;
      if (fs::is_empty(d, ec) && !ec) fs::remove(d, ec);
    }
  }

  stored_turn read_turn(const stmt& q) const {
    stored_turn t;
    t.id = q.i64(0);
    t.run = q.text(1);
    t.session = uint64_t(q.i64(2));
    t.client = q.text(3);
    t.turn = q.i64(4);
    t.started_unix_s = q.f64(5);
    if (!q.null(6)) t.audio = (fs::path(dir) / q.text(6)).string();
    t.audio_samples = q.i64(7);
    t.user_text = q.text(8);
    t.answer = q.text(9);
    t.stop_reason = q.text(10);
    t.llm_version = q.text(11);
    t.encoder_version = q.text(12);
    t.timings = nlohmann::json::parse(q.text(13), nullptr, false);
    if (t.timings.is_discarded()) t.timings = nlohmann::json::object();
    auto ev = nlohmann::json::parse(q.text(14), nullptr, false);
    if (ev.is_array())
      for (auto& e : ev)
        if (e.is_string()) t.events.push_back(e.get<std::string>());
    t.transcript = q.text(15);
    t.emotion = q.text(16);
    return t;
  }

  std::optional<int64_t> find(const std::string& run, uint64_t session, int64_t turn) const {
    stmt q(db,
           "SELECT t.id FROM turns t JOIN sessions s ON s.id = t.session_id "
           "WHERE s.run = ? AND s.session = ? AND t.turn = ?",
           where());
    q.bind(1, run).bind(2, int64_t(session)).bind(3, turn);
    if (q.step()) return q.i64(0);
    return std::nullopt;
  }

  void add_annotation(int64_t turn_id, const std::string& transcript, const std::string& emotion,
                      const std::string& source) {
    if (source != "client" && source != "cli")
      throw store_error("annotation source must be 'client' or 'cli', got '" + source + "'");
    stmt ins(db, "INSERT INTO annotations(turn_id, transcript, emotion, source, unix_s) VALUES (?, ?, ?, ?, ?)",
             where());
    ins.bind(1, turn_id).bind(2, transcript).bind(3, emotion).bind(4, source).bind(5, now_unix()).step();
  }

  int64_t index_bytes() const {
    int64_t n = 0;
    for (const char* suffix : {"", "-wal", "-shm"}) {
      std::error_code ec;
      const auto s = fs::file_size(index + suffix, ec);
      if (!ec) n += int64_t(s);
    }
    return n;
  }
};

session_store::session_store(const std::string& dir, store_options opt) : p_(std::make_unique<impl>()) {
  p_->dir = fs::absolute(dir).lexically_normal().string();
  while (p_->dir.size() > 1 && p_->dir.back() == '/') p_->dir.pop_back();
  p_->index = (fs::path(p_->dir) / "index.sqlite").string();
  p_->opt = opt;
  p_->open();
}

session_store::~session_store() = default;

const std::string& session_store::dir() const { return p_->dir; }
std::string session_store::index_path() const { return p_->index; }
const open_report& session_store::opened() const { return p_->report; }

int64_t session_store::append(const stored_turn& t, const std::vector<float>& audio_16k) {
  check_run_name(t.run);
  const std::string turn_name = "turn " + t.run + "/session-" + std::to_string(t.session) + "/turn-" +
                                std::to_string(t.turn);
  impl::writer_lock lock(p_->lock_fd, true);
  if (!lock.held) throw store_error("cannot lock " + p_->dir + "/writer.lock: " + std::strerror(errno));
  if (p_->find(t.run, t.session, t.turn))
    throw store_error(p_->where() + ": " + turn_name + " is already stored");

  // 1. the audio, durable, under its final name
  std::string rel;
  int64_t audio_bytes = 0;
  fs::path file;
  if (!audio_16k.empty()) {
    const fs::path sub = fs::path("audio") / t.run / ("session-" + std::to_string(t.session));
    rel = (sub / ("turn-" + std::to_string(t.turn) + ".flac")).generic_string();
    const fs::path d = fs::path(p_->dir) / sub;
    file = fs::path(p_->dir) / rel;
    const fs::path tmp = d / ("turn-" + std::to_string(t.turn) + ".partial.flac");
    std::error_code ec;
    const bool new_dir = fs::create_directories(d, ec);
    if (ec) throw store_error("cannot create " + d.string() + ": " + ec.message());
    try {
      save_audio(tmp.string(), audio_16k.data(), audio_16k.size(), k_speech_sample_rate, 1);
      fsync_path(tmp, false);
      fs::rename(tmp, file);
      // the rename, and any directory created on the way, must survive a power cut
      fsync_path(d, true);
      if (new_dir) {
        fsync_path(d.parent_path(), true);
        fsync_path(d.parent_path().parent_path(), true);
        fsync_path(p_->dir, true);
      }
    } catch (const std::exception& e) {
      fs::remove(tmp, ec);
      fs::remove(file, ec);
      throw store_error("cannot write the audio of " + turn_name + " under " + d.string() + ": " + e.what());
    }
    audio_bytes = int64_t(fs::file_size(file));
  }

  // 2. the row (commit = fsync of the WAL: synchronous = FULL)
  try {
    impl::txn tx(p_.get());
    auto& db = p_->db;
    const std::string w = p_->where();
    {
      stmt s(db,
             "INSERT INTO sessions(run, session, client, first_unix_s, last_unix_s) VALUES (?, ?, ?, ?, ?) "
             "ON CONFLICT(run, session) DO UPDATE SET first_unix_s = min(first_unix_s, excluded.first_unix_s), "
             "last_unix_s = max(last_unix_s, excluded.last_unix_s)",
             w);
      s.bind(1, t.run).bind(2, int64_t(t.session)).bind(3, t.client).bind(4, t.started_unix_s).bind(5, t.started_unix_s);
      s.step();
    }
    int64_t sid = 0;
    {
      stmt s(db, "SELECT id FROM sessions WHERE run = ? AND session = ?", w);
      s.bind(1, t.run).bind(2, int64_t(t.session));
      s.step();
      sid = s.i64(0);
    }
    const std::string timings = (t.timings.is_null() ? nlohmann::json::object() : t.timings).dump();
    const std::string events = nlohmann::json(t.events).dump();
    const int64_t text_bytes = int64_t(t.user_text.size() + t.answer.size() + t.stop_reason.size() +
                                       t.llm_version.size() + t.encoder_version.size() + timings.size() +
                                       events.size() + t.transcript.size() + t.emotion.size());
    stmt s(db,
           "INSERT INTO turns(session_id, turn, started_unix_s, stored_unix_s, audio, audio_samples, audio_bytes, "
           "text_bytes, user_text, answer, stop_reason, llm_version, encoder_version, timings, events) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
           w);
    s.bind(1, sid).bind(2, t.turn).bind(3, t.started_unix_s).bind(4, now_unix());
    if (rel.empty())
      s.bind_null(5);
    else
      s.bind(5, rel);
    s.bind(6, int64_t(audio_16k.size())).bind(7, audio_bytes).bind(8, text_bytes);
    s.bind(9, t.user_text).bind(10, t.answer).bind(11, t.stop_reason).bind(12, t.llm_version);
    s.bind(13, t.encoder_version).bind(14, timings).bind(15, events);
    s.step();
    const int64_t id = sqlite3_last_insert_rowid(db);
    if (!t.transcript.empty() || !t.emotion.empty()) p_->add_annotation(id, t.transcript, t.emotion, "client");
    tx.commit();
    return id;
  } catch (...) {
    // No row names the file: remove it now rather than at the next open.
    std::error_code ec;
    if (!file.empty()) fs::remove(file, ec);
    throw;
  }
}

std::vector<stored_turn> session_store::turns(const turn_filter& f) const {
  std::string sql = std::string("SELECT ") + k_turn_columns + " WHERE 1";
  if (!f.run.empty()) sql += " AND s.run = ?1";
  if (f.session >= 0) sql += " AND s.session = ?2";
  if (f.annotated_only) sql += " AND EXISTS (SELECT 1 FROM annotations a WHERE a.turn_id = t.id)";
  if (f.with_audio_only) sql += " AND t.audio IS NOT NULL";
  if (f.since_unix_s > 0) sql += " AND t.started_unix_s >= ?3";
  sql += " ORDER BY s.id, t.turn";
  if (f.limit > 0) sql += " LIMIT ?4";
  stmt q(p_->db, sql, p_->where());
  if (!f.run.empty()) q.bind(1, f.run);
  if (f.session >= 0) q.bind(2, f.session);
  if (f.since_unix_s > 0) q.bind(3, f.since_unix_s);
  if (f.limit > 0) q.bind(4, f.limit);
  std::vector<stored_turn> out;
  while (q.step()) out.push_back(p_->read_turn(q));
  return out;
}

std::optional<stored_turn> session_store::turn_by_id(int64_t id) const {
  stmt q(p_->db, std::string("SELECT ") + k_turn_columns + " WHERE t.id = ?", p_->where());
  q.bind(1, id);
  if (q.step()) return p_->read_turn(q);
  return std::nullopt;
}

std::optional<int64_t> session_store::find_turn(const std::string& run, uint64_t session, int64_t turn) const {
  return p_->find(run, session, turn);
}

std::vector<stored_session> session_store::sessions() const {
  stmt q(p_->db,
         "SELECT s.run, s.session, s.client, s.first_unix_s, s.last_unix_s, count(t.id), count(t.audio), "
         "coalesce(sum(EXISTS (SELECT 1 FROM annotations a WHERE a.turn_id = t.id)), 0), "
         "coalesce(sum(t.audio_bytes), 0) "
         "FROM sessions s LEFT JOIN turns t ON t.session_id = s.id GROUP BY s.id ORDER BY s.first_unix_s, s.id",
         p_->where());
  std::vector<stored_session> out;
  while (q.step()) {
    stored_session s;
    s.run = q.text(0);
    s.session = uint64_t(q.i64(1));
    s.client = q.text(2);
    s.first_unix_s = q.f64(3);
    s.last_unix_s = q.f64(4);
    s.turns = q.i64(5);
    s.audio_turns = q.i64(6);
    s.annotated_turns = q.i64(7);
    s.audio_bytes = q.i64(8);
    out.push_back(std::move(s));
  }
  return out;
}

std::vector<std::string> session_store::runs() const {
  stmt q(p_->db, "SELECT run FROM sessions GROUP BY run ORDER BY min(first_unix_s), min(id)", p_->where());
  std::vector<std::string> out;
  while (q.step()) out.push_back(q.text(0));
  return out;
}

std::vector<stored_annotation> session_store::annotations(int64_t turn_id) const {
  stmt q(p_->db, "SELECT id, transcript, emotion, source, unix_s FROM annotations WHERE turn_id = ? ORDER BY id",
         p_->where());
  q.bind(1, turn_id);
  std::vector<stored_annotation> out;
  while (q.step()) out.push_back({q.i64(0), q.text(1), q.text(2), q.text(3), q.f64(4)});
  return out;
}

void session_store::annotate(const std::string& run, uint64_t session, int64_t turn, const std::string& transcript,
                             const std::string& emotion, const std::string& source) {
  auto id = p_->find(run, session, turn);
  if (!id)
    throw store_error("no turn " + run + "/session-" + std::to_string(session) + "/turn-" + std::to_string(turn) +
                      " in the session store " + p_->dir + " (see `undertone sessions list`)");
  annotate(*id, transcript, emotion, source);
}

void session_store::annotate(int64_t turn_id, const std::string& transcript, const std::string& emotion,
                             const std::string& source) {
  if (transcript.empty() && emotion.empty()) throw store_error("an annotation needs a transcript or an emotion");
  impl::txn tx(p_.get());
  {
    stmt q(p_->db, "SELECT 1 FROM turns WHERE id = ?", p_->where());
    q.bind(1, turn_id);
    if (!q.step())
      throw store_error("no turn with id " + std::to_string(turn_id) + " in the session store " + p_->dir +
                        " (see `undertone sessions show`)");
  }
  p_->add_annotation(turn_id, transcript, emotion, source);
  tx.commit();
}

prune_result session_store::prune() {
  prune_result r;
  const auto& o = p_->opt;
  if (o.retention_days <= 0 && o.max_bytes <= 0) return r;
  struct row {
    int64_t id, bytes, turns;
    double last;
  };
  std::vector<row> all;
  {
    stmt q(p_->db,
           "SELECT s.id, coalesce(sum(t.audio_bytes + t.text_bytes), 0), count(t.id), s.last_unix_s "
           "FROM sessions s LEFT JOIN turns t ON t.session_id = s.id GROUP BY s.id ORDER BY s.first_unix_s, s.id",
           p_->where());
    while (q.step()) all.push_back({q.i64(0), q.i64(1), q.i64(2), q.f64(3)});
  }
  int64_t total = 0;
  for (auto& s : all) total += s.bytes;
  const double cutoff = now_unix() - o.retention_days * 86400.0;
  std::vector<int64_t> victims;
  for (auto& s : all) {
    const bool old = o.retention_days > 0 && s.last < cutoff;
    const bool over = o.max_bytes > 0 && total > o.max_bytes;
    if (!old && !over) continue;
    victims.push_back(s.id);
    total -= s.bytes;
    ++r.sessions;
    r.turns += size_t(s.turns);
  }
  if (victims.empty()) return r;
  std::vector<fs::path> files;
  std::set<fs::path> dirs;
  {
    impl::txn tx(p_.get());
    for (int64_t id : victims) {
      stmt q(p_->db, "SELECT audio, audio_bytes FROM turns WHERE session_id = ? AND audio IS NOT NULL", p_->where());
      q.bind(1, id);
      while (q.step()) {
        files.push_back(fs::path(p_->dir) / q.text(0));
        r.bytes += q.i64(1);
      }
      stmt d(p_->db, "DELETE FROM sessions WHERE id = ?", p_->where());  // turns, annotations cascade
      d.bind(1, id).step();
    }
    tx.commit();
  }
  // Rows are gone first: a crash here leaves orphans (removed at the next open), never a dangling row.
  for (auto& f : files) {
    std::error_code ec;
    fs::remove(f, ec);
    dirs.insert(f.parent_path());
    dirs.insert(f.parent_path().parent_path());
  }
  impl::remove_empty_dirs(std::vector<fs::path>(dirs.begin(), dirs.end()));
  return r;
}

export_result session_store::export_manifest_detailed(const std::string& path, const export_options& o) const {
  if (o.val_fraction < 0 || o.val_fraction > 1)
    throw store_error("export: val fraction must be in [0, 1], got " + std::to_string(o.val_fraction));
  turn_filter f;
  f.run = o.run;
  f.session = o.session;
  f.annotated_only = true;
  f.with_audio_only = true;
  export_result r;
  std::vector<utterance> rows;
  for (auto& t : turns(f)) {
    if (t.transcript.empty() && o.require_transcript) {
      ++r.skipped_no_transcript;
      continue;
    }
    utterance u;
    if (t.emotion.empty()) {
      u.emotion = emotion_label::unlabeled;
    } else {
      try {
        u.emotion = parse_emotion(lower(t.emotion));
      } catch (const manifest_error&) {
        ++r.skipped_label;
        ++r.unknown_labels[t.emotion];
        continue;
      }
    }
    u.audio = t.audio;
    u.transcript = t.transcript;
    u.speaker = export_speaker(t);
    u.corpus = o.corpus;
    u.split = parse_split(export_split(u.speaker, o.val_fraction));
    u.duration_s = double(t.audio_samples) / k_speech_sample_rate;
    u.source = {{"store_turn_id", t.id}, {"run", t.run},           {"session", t.session},
                {"turn", t.turn},        {"client", t.client},     {"llm_version", t.llm_version},
                {"encoder_version", t.encoder_version}};
    rows.push_back(std::move(u));
  }
  write_manifest(path, rows);
  r.written = rows.size();
  return r;
}

size_t session_store::export_manifest(const std::string& path, const export_options& o) const {
  return export_manifest_detailed(path, o).written;
}

std::string session_store::integrity_check() const {
  stmt q(p_->db, "PRAGMA integrity_check", p_->where());
  std::string out;
  while (q.step()) out += (out.empty() ? "" : "\n") + q.text(0);
  return out;
}

int64_t session_store::size_bytes() const {
  stmt q(p_->db, "SELECT coalesce(sum(audio_bytes), 0) FROM turns", p_->where());
  q.step();
  return q.i64(0) + p_->index_bytes();
}

}  // namespace undertone::models
