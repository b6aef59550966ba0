// The HTTP pump: one epoll thread answering the binary-tensor infer requests of keep-alive connections the
// Python HTTP server handed over (http_pump.py). A connection comes with the exact bytes of the request Python
// answered on it before its tensor (request line, headers, JSON header), the tensor's length and the exact
// bytes of Python's answer before the output tensor. Every following request whose bytes before the tensor
// are the same is answered here: the tensor is read into a pooled 64-byte aligned buffer, submitted to the
// model's engine, and the saved answer (a fresh Date) plus the output rows are written from the engine's
// thread. Anything else goes back to Python with every byte it has not answered (pump_events), which answers
// it as it answers any request: the pump knows no HTTP beyond "the same bytes as before".
//
// A request whose input is in a system shared memory region has no tensor bytes: the tensor is read from the
// region (pread, shm_regions.h; shared_memory.py mirrors every registration here); an output asked in a region is
// written there (pwrite) and the saved answer is all the answer. A region that is gone, too small or truncated
// sends the request back to Python, which words the error.
#include <errno.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include "engine.h"
#include "finite.h"
#include "front_stats.h"
#include "shm_regions.h"

namespace tvmzoo {
namespace {

constexpr size_t kAlignment = 64;
constexpr size_t kPooledPerSize = 64;   // free tensor buffers kept per size
constexpr int kMaxEvents = 64;

// Why a connection left the pump (pump_events); Python adopts it again unless it is closed.
enum Reason : int64_t { kClosed = 0, kMismatch = 1, kRefused = 2, kFailed = 3, kStalled = 4, kDraining = 5,
                        kEngineClosed = 6 };

// Tensor buffers by size: a 602 KB request allocated afresh would be page-faulted in on every request.
class BufferPool {
 public:
  std::shared_ptr<void> Get(size_t size) {
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto& free = free_[size];
      if (!free.empty()) {
        data = free.back();
        free.pop_back();
      }
    }
    if (data == nullptr) data = std::aligned_alloc(kAlignment, (size + kAlignment - 1) / kAlignment * kAlignment);
    if (data == nullptr) return nullptr;
    return std::shared_ptr<void>(data, [this, size](void* p) { Put(size, p); });
  }

 private:
  void Put(size_t size, void* data) {
    std::lock_guard<std::mutex> lock(mu_);
    auto& free = free_[size];
    if (free.size() < kPooledPerSize) {
      free.push_back(data);
    } else {
      std::free(data);
    }
  }
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
};

BufferPool* Pool() {
  static BufferPool* pool = new BufferPool();   // never destroyed: buffers may come back at exit
  return pool;
}

// The Date header's value as Python's email.utils.formatdate(usegmt=True) writes it (29 bytes).
void FormatDate(char out[29]) {
  thread_local time_t second = 0;
  thread_local char value[30];
  time_t now = time(nullptr);
  if (now != second) {
    static const char* days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char* months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                   "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    struct tm t;
    gmtime_r(&now, &t);
    snprintf(value, sizeof(value), "%s, %02d %s %04d %02d:%02d:%02d GMT", days[t.tm_wday], t.tm_mday,
             months[t.tm_mon], t.tm_year + 1900, t.tm_hour, t.tm_min, t.tm_sec);
    second = now;
  }
  memcpy(out, value, 29);
}

// Where a connection's tensors are when not on the wire: system shared memory regions by name ("": on the wire).
struct ShmPlaces {
  std::string in_region, out_region;
  int64_t in_offset = 0, out_offset = 0, out_span = 0;
};

struct Conn {
  int64_t id = 0;
  int fd = -1;
  Engine* engine = nullptr;
  FrontStats* stats = nullptr;   // its model's (engine handle's)
  std::string request_prefix;     // the bytes every request here must start with
  int64_t tensor_bytes = 0;
  int64_t rows = 0;
  std::string answer_prefix;      // the answer before the outputs; Date rewritten in place
  size_t date_at = std::string::npos;
  int64_t output_bytes = 0;
  ShmPlaces shm;                   // a region holds the input (no tensor in the request) / the output (none in
                                  // the answer)
  int64_t wire_output_bytes() const { return shm.out_region.empty() ? output_bytes : 0; }

  // pump thread only
  std::string in;                 // received, not yet part of a request's tensor
  bool in_tensor = false;         // the prefix matched: reading the tensor
  std::shared_ptr<void> tensor;   // the current request's tensor (kept for a hand-back until answered)
  int64_t filled = 0;             // tensor bytes received
  std::shared_ptr<const ShmRegion> out_held;   // the current request's output region

  // shared with the engine's threads
  std::atomic<int64_t> last_active_ns{0};
  std::mutex mu;
  bool in_flight = false;
  bool need_service = false;      // bytes arrived (or may have) while in flight: the pump resumes after it
  int64_t failed = -1;            // the answer's Reason when the engine refused or failed it
  bool broken = false;            // a write failed: close
  bool gone = false;              // closed or handed back: an answer still due is dropped
  std::string out;                // answer bytes the socket would not take yet
  size_t out_at = 0;
};

class Pump {
 public:
  explicit Pump(double idle_timeout_s) : idle_ns_(static_cast<int64_t>(idle_timeout_s * 1e9)) {
    epoll_ = epoll_create1(EPOLL_CLOEXEC);
    wake_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    notify_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (epoll_ < 0 || wake_ < 0 || notify_ < 0) TVM_FFI_THROW(RuntimeError) << "pump: " << strerror(errno);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = 0;
    epoll_ctl(epoll_, EPOLL_CTL_ADD, wake_, &ev);
    thread_ = std::thread([this] { Run(); });
  }

  ~Pump() {
    close(epoll_);
    close(wake_);
    close(notify_);
  }

  int notify_fd() const { return notify_; }

  ShmRegions& regions() { return regions_; }

  // Python hands a connection over; returns its id (0: refused, Python keeps it). `shm`: the input's and the
  // output's shared memory region, empty names when on the wire.
  int64_t Adopt(int fd, int64_t handle, std::string request_prefix, int64_t tensor_bytes,
                std::string answer_prefix, int64_t output_bytes, std::string received, ShmPlaces shm) {
    Engine* engine = EngineFromHandle(handle);
    if (engine == nullptr || tensor_bytes <= 0 || engine->row_bytes() <= 0 ||
        tensor_bytes % engine->row_bytes() != 0 ||
        output_bytes != tensor_bytes / engine->row_bytes() * engine->output_row_floats() * 4 ||
        (!shm.out_region.empty() && shm.out_span < output_bytes)) {
      return 0;   // not the engine's rows, or not its outputs: Python keeps it
    }
    auto c = std::make_shared<Conn>();
    c->shm = std::move(shm);
    c->fd = fd;
    c->engine = engine;
    c->rows = tensor_bytes / engine->row_bytes();
    c->tensor_bytes = tensor_bytes;
    c->output_bytes = output_bytes;
    c->request_prefix = std::move(request_prefix);
    c->answer_prefix = std::move(answer_prefix);
    c->in = std::move(received);
    size_t date = c->answer_prefix.find("\r\nDate: ");
    if (date != std::string::npos && date + 8 + 29 + 2 <= c->answer_prefix.size() &&
        c->answer_prefix.compare(date + 8 + 29, 2, "\r\n") == 0) {
      c->date_at = date + 8;
    }
    c->last_active_ns = NowNs();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (draining_) return 0;
      c->id = ++last_id_;
      auto& stats = stats_[handle];
      if (!stats) stats = std::make_unique<FrontStats>();
      c->stats = stats.get();
      conns_[c->id] = c;
      woken_.push_back(c->id);   // serve what came with it, then read
    }
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = static_cast<uint64_t>(c->id);
    if (epoll_ctl(epoll_, EPOLL_CTL_ADD, fd, &ev) != 0) {
      std::lock_guard<std::mutex> lock(mu_);
      conns_.erase(c->id);
      return 0;
    }
    Wake();
    return c->id;
  }

  // Connections that left the pump since the last call, flattened: id, fd, reason, bytes (Python adopts the
  // fd with the bytes first, unless the reason is kClosed).
  tvm::ffi::Array<tvm::ffi::Any> Events() {
    std::vector<std::tuple<int64_t, int, int64_t, std::string>> events;
    {
      std::lock_guard<std::mutex> lock(mu_);
      events.swap(events_);
    }
    tvm::ffi::Array<tvm::ffi::Any> result;
    for (auto& [id, fd, reason, bytes] : events) {
      result.push_back(id);
      result.push_back(static_cast<int64_t>(fd));
      result.push_back(reason);
      result.push_back(tvm::ffi::Bytes(std::move(bytes)));
    }
    return result;
  }

  // success, request_ns, pending, last success (unix ms) of one engine handle's requests here.
  tvm::ffi::Array<int64_t> Stats(int64_t handle) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = stats_.find(handle);
    if (it == stats_.end()) return {0, 0, 0, 0};
    return it->second->Read();
  }

  // Stop taking requests: answer those in flight, then hand every connection back.
  void Drain() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      draining_ = true;
      for (auto& [id, c] : conns_) woken_.push_back(id);
    }
    Wake();
  }

  // Python drained first: normally nothing is left. True when no answer is still due from an engine.
  bool Stop() {
    if (thread_.joinable()) {
      stopping_ = true;
      Wake();
      thread_.join();
    }
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, c] : conns_) {
      std::lock_guard<std::mutex> conn_lock(c->mu);
      c->gone = true;
      close(c->fd);
    }
    conns_.clear();
    return in_flight_.load() == 0;
  }

  // From an engine thread: the connection needs the pump.
  void WakeFor(int64_t id) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      woken_.push_back(id);
    }
    Wake();
  }

 private:
  void Wake() {
    uint64_t one = 1;
    ssize_t ignored = write(wake_, &one, sizeof(one));
    (void)ignored;
  }

  void Run() {
    pthread_setname_np(pthread_self(), "http-pump");   // as top -H and /proc/<pid>/task show it
    epoll_event events[kMaxEvents];
    int64_t next_sweep = NowNs() + SweepInterval();
    while (!stopping_) {
      int timeout_ms = static_cast<int>(std::max<int64_t>(0, (next_sweep - NowNs()) / 1000000) + 1);
      int n = epoll_wait(epoll_, events, kMaxEvents, timeout_ms);
      for (int i = 0; i < n; ++i) {
        if (events[i].data.u64 == 0) {
          uint64_t count;
          ssize_t ignored = read(wake_, &count, sizeof(count));
          (void)ignored;
          continue;
        }
        if (auto c = Find(static_cast<int64_t>(events[i].data.u64))) Service(c);
      }
      std::deque<int64_t> woken;
      {
        std::lock_guard<std::mutex> lock(mu_);
        woken.swap(woken_);
      }
      for (int64_t id : woken) {
        if (auto c = Find(id)) Service(c);
      }
      for (Engine* engine : kicks_) engine->Kick();   // the pass's requests, one wake-up per engine
      kicks_.clear();
      if (NowNs() >= next_sweep) {
        Sweep();
        next_sweep = NowNs() + SweepInterval();
      }
    }
  }

  int64_t SweepInterval() const { return std::min<int64_t>(1000000000, idle_ns_ / 2); }

  std::shared_ptr<Conn> Find(int64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = conns_.find(id);
    return it == conns_.end() ? nullptr : it->second;
  }

  // Idle past the timeout: closed when nothing is half-received, else back to Python (408).
  void Sweep() {
    std::vector<std::shared_ptr<Conn>> all;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [id, c] : conns_) all.push_back(c);
    }
    int64_t now = NowNs();
    for (auto& c : all) {
      if (now - c->last_active_ns < idle_ns_) continue;
      std::unique_lock<std::mutex> lock(c->mu);
      if (c->in_flight) continue;
      bool unread_answer = c->out_at < c->out.size();
      lock.unlock();
      if (unread_answer) {
        Leave(c, kClosed);   // the client reads no answer: it would hold ours forever
      } else if (c->in_tensor || !c->in.empty()) {
        Leave(c, kStalled);
      } else {
        Leave(c, kClosed);
      }
    }
  }

  // Read and answer what the connection has, until the socket has no more or a request is in flight.
  void Service(const std::shared_ptr<Conn>& c) {
    {
      std::unique_lock<std::mutex> lock(c->mu);
      if (c->in_flight) {
        c->need_service = true;
        return;
      }
      c->need_service = false;
      int64_t reason = c->broken ? kClosed : c->failed;
      if (reason < 0 && c->out_at < c->out.size() && !Flush(c.get())) {
        if (!c->broken) return;   // the rest when EPOLLOUT says the socket takes it
        reason = kClosed;
      }
      if (reason >= 0) {
        c->failed = -1;
        lock.unlock();
        Leave(c, reason);
        return;
      }
    }
    if (!c->in_tensor) c->tensor.reset();   // answered: back to the pool
    if (draining_) {
      Leave(c, kDraining);
      return;
    }
    while (true) {
      if (!c->in_tensor) {
        size_t want = c->request_prefix.size();
        if (c->in.size() < want && !ReadInto(c, want - c->in.size())) return;
        size_t have = std::min(c->in.size(), want);
        if (memcmp(c->in.data(), c->request_prefix.data(), have) != 0) {
          Leave(c, kMismatch);
          return;
        }
        if (have < want) continue;   // ReadInto read some: read on
        if (!c->shm.out_region.empty()) {
          c->out_held = regions_.Find(c->shm.out_region, c->shm.out_offset, c->shm.out_span);
          if (!c->out_held) {
            Leave(c, kMismatch);   // the region is gone or changed: Python answers (its error)
            return;
          }
        }
        c->tensor = Pool()->Get(static_cast<size_t>(c->tensor_bytes));
        if (!c->tensor) {
          Leave(c, kFailed);
          return;
        }
        if (!c->shm.in_region.empty()) {
          if (!ReadRegion(c)) {
            c->tensor.reset();
            c->out_held.reset();
            Leave(c, kMismatch);   // the request is still all in c->in: Python answers (its error)
            return;
          }
          c->in.erase(0, want);
          Submit(c);
          return;
        }
        int64_t extra = std::min<int64_t>(c->in.size() - want, c->tensor_bytes);
        memcpy(c->tensor.get(), c->in.data() + want, extra);
        c->in.erase(0, want + extra);
        c->filled = extra;
        c->in_tensor = true;
      }
      while (c->filled < c->tensor_bytes) {
        ssize_t n = recv(c->fd, static_cast<char*>(c->tensor.get()) + c->filled, c->tensor_bytes - c->filled, 0);
        if (n > 0) {
          c->filled += n;
          c->last_active_ns = NowNs();
        } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
          Leave(c, kClosed);   // the client went away mid-request: nobody to answer
          return;
        } else if (errno != EINTR) {
          return;
        }
      }
      Submit(c);
      return;
    }
  }

  // The input from its shared memory region into c->tensor; false: the region is gone, too small or truncated.
  bool ReadRegion(const std::shared_ptr<Conn>& c) {
    auto region = regions_.Find(c->shm.in_region, c->shm.in_offset, c->tensor_bytes);
    if (!region || !region->Read(c->shm.in_offset, c->tensor_bytes, c->tensor.get()))
      return false;
    c->filled = c->tensor_bytes;
    c->last_active_ns = NowNs();
    return true;
  }

  // Append up to `want` bytes to c->in; false when the socket has none now (or the connection is gone).
  bool ReadInto(const std::shared_ptr<Conn>& c, size_t want) {
    size_t old = c->in.size();
    c->in.resize(old + want);
    ssize_t n;
    do {
      n = recv(c->fd, &c->in[old], want, 0);
    } while (n < 0 && errno == EINTR);
    c->in.resize(old + std::max<ssize_t>(n, 0));
    if (n > 0) {
      c->last_active_ns = NowNs();
      return true;
    }
    if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) Leave(c, kClosed);   // the client closed
    return false;
  }

  void Submit(const std::shared_ptr<Conn>& c) {
    bool check = c->engine->checks_finite32();
    if (check && !AllFinite32(c->tensor.get(), c->tensor_bytes / 4)) {   // Python refuses it, with the message
      Leave(c, kRefused);
      return;
    }
    c->in_tensor = false;
    {
      std::lock_guard<std::mutex> lock(c->mu);
      c->in_flight = true;
    }
    c->stats->pending.fetch_add(1);
    in_flight_.fetch_add(1);
    int64_t start = NowNs();
    Pump* pump = this;
    Rows rows{c->tensor.get(), c->rows, c->tensor, check};
    bool queued = c->engine->Submit(std::move(rows), [pump, c, start](const float* outputs, int64_t n,
                                                                      bool refused, const std::string& error) {
      pump->Done(c, start, outputs, n, refused, error);
    }, /*wake=*/false);
    if (queued && std::find(kicks_.begin(), kicks_.end(), c->engine) == kicks_.end()) kicks_.push_back(c->engine);
    if (!queued) {
      c->stats->pending.fetch_sub(1);
      in_flight_.fetch_sub(1);
      {
        std::lock_guard<std::mutex> lock(c->mu);
        c->in_flight = false;
      }
      Leave(c, kEngineClosed);
      return;
    }
    // Anything more already here (a pipelining client, or the client's close)? Read no tensor while one is in
    // flight; the answer's thread wakes the pump when there was.
    bool more = false;
    if (c->in.size() < c->request_prefix.size()) {
      size_t want = c->request_prefix.size() - c->in.size();
      size_t old = c->in.size();
      c->in.resize(old + want);
      ssize_t n = recv(c->fd, &c->in[old], want, 0);
      c->in.resize(old + std::max<ssize_t>(n, 0));
      more = n != -1 || (errno != EAGAIN && errno != EWOULDBLOCK);
      if (n > 0) c->last_active_ns = NowNs();
    } else {
      more = true;
    }
    if (more) {
      std::lock_guard<std::mutex> lock(c->mu);
      if (c->in_flight) {
        c->need_service = true;
        return;
      }
    }
    if (more) WakeFor(c->id);   // answered already
  }

  // On the engine's thread: write the answer (or tell the pump it failed).
  void Done(const std::shared_ptr<Conn>& c, int64_t start, const float* outputs, int64_t rows, bool refused,
            const std::string& error) {
    bool wake = false;
    std::shared_ptr<const ShmRegion> out_region = std::move(c->out_held);
    if (outputs != nullptr && out_region && !out_region->Write(c->shm.out_offset, outputs, c->output_bytes))
      outputs = nullptr;   // the object was truncated meanwhile: Python runs it again and says so
    if (outputs != nullptr) c->stats->Answered(start);
    c->stats->pending.fetch_sub(1);
    {
      std::lock_guard<std::mutex> lock(c->mu);
      c->in_flight = false;
      if (c->gone) {   // the pump stopped past the drain deadline: nobody to answer
        in_flight_.fetch_sub(1);
        return;
      }
      if (outputs == nullptr) {
        c->failed = refused ? kRefused : kFailed;
        wake = true;
      } else {
        if (c->date_at != std::string::npos) FormatDate(&c->answer_prefix[c->date_at]);
        iovec iov[2] = {{c->answer_prefix.data(), c->answer_prefix.size()},
                        {const_cast<float*>(outputs), static_cast<size_t>(c->wire_output_bytes())}};
        size_t total = iov[0].iov_len + iov[1].iov_len;
        msghdr msg{};
        msg.msg_iov = iov;
        msg.msg_iovlen = 2;
        ssize_t n;
        do {
          n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
        } while (n < 0 && errno == EINTR);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
          c->broken = true;
          wake = true;
        } else if (static_cast<size_t>(std::max<ssize_t>(n, 0)) < total) {   // the rest when it can go
          size_t sent = static_cast<size_t>(std::max<ssize_t>(n, 0));
          c->out.assign(c->answer_prefix);
          c->out.append(reinterpret_cast<const char*>(outputs), c->wire_output_bytes());
          c->out_at = sent;
          wake = true;   // the pump flushes it when EPOLLOUT says so (or now, if it already did)
        } else {
          c->last_active_ns = NowNs();
        }
        wake = wake || c->need_service || draining_;
      }
    }
    if (wake) WakeFor(c->id);
    in_flight_.fetch_sub(1);   // last: Stop() may free the pump once it reads 0
  }

  // Under c->mu: write what c->out holds; true when all of it went.
  bool Flush(Conn* c) {
    while (c->out_at < c->out.size()) {
      ssize_t n = send(c->fd, c->out.data() + c->out_at, c->out.size() - c->out_at, MSG_NOSIGNAL);
      if (n > 0) {
        c->out_at += n;
        c->last_active_ns = NowNs();
      } else if (n < 0 && errno == EINTR) {
        continue;
      } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        return false;
      } else {
        c->broken = true;
        return false;
      }
    }
    c->out.clear();
    c->out_at = 0;
    return true;
  }

  // The connection leaves the pump: closed, or back to Python with every byte not answered yet.
  void Leave(const std::shared_ptr<Conn>& c, int64_t reason) {
    epoll_ctl(epoll_, EPOLL_CTL_DEL, c->fd, nullptr);
    {
      std::lock_guard<std::mutex> lock(c->mu);
      c->gone = true;
    }
    std::string bytes;
    if (reason != kClosed) {
      if (c->tensor && (c->in_tensor || reason == kRefused || reason == kFailed || reason == kEngineClosed)) {
        bytes = c->request_prefix;   // a shared memory input's request has no tensor bytes
        bool taken = reason == kRefused || reason == kFailed || reason == kEngineClosed;
        bytes.append(static_cast<const char*>(c->tensor.get()),
                     c->shm.in_region.empty() ? (taken ? c->tensor_bytes : c->filled) : 0);
      }
      bytes += c->in;
    } else {
      close(c->fd);
    }
    c->tensor.reset();
    c->in.clear();
    {
      std::lock_guard<std::mutex> lock(mu_);
      conns_.erase(c->id);
      events_.emplace_back(c->id, reason == kClosed ? -1 : c->fd, reason, std::move(bytes));
    }
    uint64_t one = 1;
    ssize_t ignored = write(notify_, &one, sizeof(one));
    (void)ignored;
  }

  const int64_t idle_ns_;
  int epoll_ = -1, wake_ = -1, notify_ = -1;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> draining_{false};
  std::atomic<int64_t> in_flight_{0};   // submitted, Done not returned
  std::mutex mu_;   // guards what follows
  int64_t last_id_ = 0;
  std::map<int64_t, std::shared_ptr<Conn>> conns_;
  std::deque<int64_t> woken_;
  std::vector<Engine*> kicks_;   // the pump thread's own: engines given requests in this pass, not yet woken
  std::vector<std::tuple<int64_t, int, int64_t, std::string>> events_;
  std::unordered_map<int64_t, std::unique_ptr<FrontStats>> stats_;
  ShmRegions regions_;   // shared_memory.py's, mirrored (its own lock)
};

std::mutex pumps_mu;
// never destroyed: at exit a pump not destroyed by Python keeps its thread (a static map would destroy it running)
auto& pumps = *new std::unordered_map<int64_t, std::unique_ptr<Pump>>();
int64_t last_pump = 0;

Pump* Get(int64_t handle) {
  std::lock_guard<std::mutex> lock(pumps_mu);
  auto it = pumps.find(handle);
  if (it == pumps.end()) TVM_FFI_THROW(ValueError) << "unknown pump " << handle;
  return it->second.get();
}

}  // namespace

// The functions Python calls (http_pump.Pump), each exported after it.

int64_t PumpCreate(double idle_timeout_s) {
  auto pump = std::make_unique<Pump>(idle_timeout_s);
  std::lock_guard<std::mutex> lock(pumps_mu);
  pumps[++last_pump] = std::move(pump);
  return last_pump;
}
TVM_FFI_DLL_EXPORT_TYPED_FUNC(pump_create, PumpCreate);

int64_t PumpNotifyFd(int64_t pump) { return Get(pump)->notify_fd(); }
TVM_FFI_DLL_EXPORT_TYPED_FUNC(pump_notify_fd, PumpNotifyFd);

// `in_region` / `out_region`: the shared memory regions of the input / output ("": on the wire).
int64_t PumpAdopt(int64_t pump, int64_t fd, int64_t engine, tvm::ffi::Bytes request_prefix, int64_t tensor_bytes,
                  tvm::ffi::Bytes answer_prefix, int64_t output_bytes, tvm::ffi::Bytes received,
                  tvm::ffi::String in_region, int64_t in_offset, tvm::ffi::String out_region, int64_t out_offset,
                  int64_t out_span) {
  ShmPlaces shm{std::string(in_region), std::string(out_region), in_offset, out_offset, out_span};
  return Get(pump)->Adopt(static_cast<int>(fd), engine, std::string(request_prefix.data(), request_prefix.size()),
                          tensor_bytes, std::string(answer_prefix.data(), answer_prefix.size()), output_bytes,
                          std::string(received.data(), received.size()), std::move(shm));
}
TVM_FFI_DLL_EXPORT_TYPED_FUNC(pump_adopt, PumpAdopt);

// shared_memory.py's registrations, mirrored: the object's descriptor (duplicated here) and the region's place.
void PumpAddRegion(int64_t pump, tvm::ffi::String name, int64_t fd, int64_t offset, int64_t byte_size) {
  std::string error = Get(pump)->regions().Add(std::string(name), static_cast<int>(fd), offset, byte_size);
  if (!error.empty()) TVM_FFI_THROW(RuntimeError) << error;
}
TVM_FFI_DLL_EXPORT_TYPED_FUNC(pump_add_region, PumpAddRegion);

void PumpRemoveRegion(int64_t pump, tvm::ffi::String name) { Get(pump)->regions().Remove(std::string(name)); }
TVM_FFI_DLL_EXPORT_TYPED_FUNC(pump_remove_region, PumpRemoveRegion);

tvm::ffi::Array<tvm::ffi::Any> PumpEvents(int64_t pump) { return Get(pump)->Events(); }
TVM_FFI_DLL_EXPORT_TYPED_FUNC(pump_events, PumpEvents);

tvm::ffi::Array<int64_t> PumpStats(int64_t pump, int64_t engine) { return Get(pump)->Stats(engine); }
TVM_FFI_DLL_EXPORT_TYPED_FUNC(pump_stats, PumpStats);

void PumpDrain(int64_t pump) { Get(pump)->Drain(); }
TVM_FFI_DLL_EXPORT_TYPED_FUNC(pump_drain, PumpDrain);

void PumpDestroy(int64_t pump) {
  std::unique_ptr<Pump> gone;
  {
    std::lock_guard<std::mutex> lock(pumps_mu);
    auto it = pumps.find(pump);
    if (it == pumps.end()) return;
    gone = std::move(it->second);
    pumps.erase(it);
  }
  if (!gone->Stop()) gone.release();   // an engine may still call it (past the drain deadline): never freed
}
TVM_FFI_DLL_EXPORT_TYPED_FUNC(pump_destroy, PumpDestroy);

}  // namespace tvmzoo
