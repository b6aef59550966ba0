// The native gRPC front of `tvmzoo serve --native` (grpc_native.py): a C++ gRPC server (system libgrpc++, the
// generic callback API: no generated code) on the public gRPC port, in the server process.
//
// A ModelInfer call, and each message of a ModelStreamInfer stream, that is a plain tensor infer of a model a
// native engine serves (one input of the model's name, datatype and row shape, in raw_input_contents or in a
// registered system shared memory region; no other tensor or request parameters, no contents; at most the model's
// output requested, with no parameters or a shared memory region's) is read here (a protobuf wire scan; the
// tensor is copied once, from grpc's slices or with pread from the region, into a 64-byte aligned buffer),
// submitted to the engine (engine.h) and answered with the ModelInferResponse grpc_service.py would send,
// serialized here (an output asked in shared memory is written there with pwrite, its raw contents left empty).
// Everything else -- every other method, every other message, a request the engine refuses or fails, anything
// while draining or without the bearer token -- is forwarded unchanged (metadata, deadline, messages, status,
// trailing metadata) to the Python grpc.aio server on a private unix socket, which answers it as it answers any
// call: its wording, its checks, its metrics. A stream forwards over one upstream stream, opened at its first
// forwarded message.
//
// Connections are accepted here (not by grpc: libgrpc 1.51 has no connection limit) and handed to the server
// with AddInsecureChannelFromFd; past --max-connections open ones a new connection is closed at once, as
// grpc.aio does with grpc.max_allowed_incoming_connections.
#include <arpa/inet.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/server_posix.h>

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <cctype>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "engine.h"
#include "finite.h"
#include "front_stats.h"
#include "shm_regions.h"

namespace tvmzoo {
namespace {

namespace ffi = tvm::ffi;
constexpr size_t kAlignment = 64;
constexpr int64_t kMaxRows = 256;   // inference.py MAX_ROWS
const char* const kInferMethod = "/inference.GRPCInferenceService/ModelInfer";
const char* const kStreamMethod = "/inference.GRPCInferenceService/ModelStreamInfer";

// ---- protobuf wire format ----

// A received message as grpc holds it: slices, read without joining them.
class Received {
 public:
  explicit Received(const grpc::ByteBuffer& buffer) {
    grpc::ByteBuffer copy(buffer);   // Dump is not const; the copy shares the slices
    ok_ = copy.Dump(&slices_).ok();
    for (const auto& s : slices_) {
      starts_.push_back(size_);
      size_ += s.size();
    }
  }
  bool ok() const { return ok_; }
  size_t size() const { return size_; }

  // Copy [pos, pos + n) into dst; false past the end.
  bool Copy(size_t pos, size_t n, void* dst) const {
    if (pos > size_ || n > size_ - pos) return false;
    auto* out = static_cast<uint8_t*>(dst);
    size_t i = std::upper_bound(starts_.begin(), starts_.end(), pos) - starts_.begin() - 1;
    while (n) {
      size_t at = pos - starts_[i], take = std::min(n, slices_[i].size() - at);
      std::memcpy(out, slices_[i].begin() + at, take);
      out += take, pos += take, n -= take, ++i;
    }
    return true;
  }

 private:
  std::vector<grpc::Slice> slices_;
  std::vector<size_t> starts_;
  size_t size_ = 0;
  bool ok_ = false;
};

// Reads fields from bytes at hand (a small submessage, or a Received's window copied out).
class Scan {
 public:
  explicit Scan(std::string_view data) : p_(data.data()), end_(data.data() + data.size()) {}
  bool Done() const { return p_ >= end_; }
  size_t Offset(const char* base) const { return p_ - base; }
  bool Varint(uint64_t& value) {
    value = 0;
    for (int shift = 0; shift < 64 && p_ < end_; shift += 7) {
      uint8_t byte = static_cast<uint8_t>(*p_++);
      value |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if (byte < 0x80) return true;
    }
    return false;
  }
  // A length-delimited field's bytes (false: truncated).
  bool Bytes(std::string_view& out) {
    uint64_t n;
    if (!Varint(n) || n > static_cast<uint64_t>(end_ - p_)) return false;
    out = std::string_view(p_, n);
    p_ += n;
    return true;
  }

 private:
  const char* p_;
  const char* end_;
};

void PutVarint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

void PutBytes(std::string& out, uint32_t field, std::string_view bytes) {
  PutVarint(out, (field << 3) | 2);
  PutVarint(out, bytes.size());
  out.append(bytes);
}

// ---- what the hot path answers ----

struct Model {
  Engine* engine = nullptr;
  int64_t handle = 0;
  std::string input_name, datatype, output_name;
  std::vector<int64_t> row_shape;
  int64_t row_bytes = 0, classes = 0;
};

// A ModelInferRequest the engine can answer as grpc_service.py would: its fields, the tensor's place.
struct HotRequest {
  const Model* model = nullptr;
  std::string model_name, id;
  int64_t rows = 0;
  size_t raw_at = 0;
  std::shared_ptr<const ShmRegion> out_region;   // the output asked in shared memory, at out_at
  int64_t out_at = 0;
  int64_t output_bytes() const { return rows * model->classes * static_cast<int64_t>(sizeof(float)); }
};

// A tensor's system shared memory parameters (shared_memory.py's shm_ref).
struct ShmParams {
  std::string region;
  int64_t byte_size = -1, offset = 0;
  bool given = false;   // any of them
  // All that is needed, or none at all (else Python words what is missing).
  bool complete() const { return !given || (!region.empty() && byte_size >= 0); }
};

// One entry of a tensor's parameters map (key = 1, value = 2: an InferParameter). Hot only for the shared memory
// keys with the types tritonclient sends (string_param = 3 for the region, int64_param = 2 for the sizes).
bool ShmParameter(std::string_view entry, ShmParams& p) {
  Scan s(entry);
  std::string_view key, value;
  while (!s.Done()) {
    uint64_t tag;
    std::string_view bytes;
    if (!s.Varint(tag) || (tag & 7) != 2 || !s.Bytes(bytes)) return false;
    if (tag >> 3 == 1) key = bytes;
    else if (tag >> 3 == 2) value = bytes;
    else return false;
  }
  Scan v(value);
  uint64_t tag, number;
  if (!v.Varint(tag)) return false;
  if (key == "shared_memory_region") {
    std::string_view name;
    if (tag != ((3 << 3) | 2) || !v.Bytes(name) || name.empty()) return false;
    p.region = name;
  } else if (key == "shared_memory_byte_size" || key == "shared_memory_offset") {
    if (tag != (2 << 3) || !v.Varint(number) || static_cast<int64_t>(number) < 0) return false;
    (key == "shared_memory_offset" ? p.offset : p.byte_size) = static_cast<int64_t>(number);
  } else {
    return false;
  }
  p.given = true;
  return v.Done();
}

// One InferInputTensor: hot only with exactly the model's name, datatype and [n, row...] shape, and no parameters
// but shared memory ones.
bool HotInput(std::string_view data, const Model& m, int64_t& rows, ShmParams& shm) {
  Scan s(data);
  std::string_view name, datatype, packed;
  std::vector<int64_t> shape;
  while (!s.Done()) {
    uint64_t key, v;
    if (!s.Varint(key)) return false;
    if ((key & 7) == 2) {
      std::string_view bytes;
      if (!s.Bytes(bytes)) return false;
      if (key >> 3 == 1) name = bytes;
      else if (key >> 3 == 2) datatype = bytes;
      else if (key >> 3 == 3) {
        Scan dims(bytes);
        while (!dims.Done()) {
          if (!dims.Varint(v)) return false;
          shape.push_back(static_cast<int64_t>(v));
        }
      } else if (key >> 3 != 4 || !ShmParameter(bytes, shm)) {
        return false;   // contents, or other parameters
      }
    } else if (key == (3 << 3)) {   // an unpacked shape element
      if (!s.Varint(v)) return false;
      shape.push_back(static_cast<int64_t>(v));
    } else {
      return false;
    }
  }
  if (!shm.complete()) return false;
  if (name != m.input_name || datatype != m.datatype || shape.size() != m.row_shape.size() + 1) return false;
  if (!std::equal(m.row_shape.begin(), m.row_shape.end(), shape.begin() + 1)) return false;
  rows = shape[0];
  return rows >= 1 && rows <= kMaxRows;
}

// One InferRequestedOutputTensor: hot only when it names the model's output and has no parameters but shared
// memory ones.
bool HotOutput(std::string_view data, const Model& m, ShmParams& shm) {
  Scan s(data);
  std::string_view name;
  while (!s.Done()) {
    uint64_t key;
    std::string_view bytes;
    if (!s.Varint(key) || (key & 7) != 2 || !s.Bytes(bytes)) return false;
    if (key >> 3 == 1) name = bytes;
    else if (key >> 3 != 2 || !ShmParameter(bytes, shm)) return false;
  }
  return name == m.output_name && shm.complete();
}

// The response grpc_service.encode_response builds for one FP32 output, serialized as protobuf does.
std::string InferResponse(const HotRequest& r, const float* values) {
  std::string shape, tensor, out;
  PutVarint(shape, r.rows);
  PutVarint(shape, r.model->classes);
  PutBytes(tensor, 1, r.model->output_name);
  PutBytes(tensor, 2, "FP32");
  PutBytes(tensor, 3, shape);
  size_t bytes = r.output_bytes();
  out.reserve(r.model_name.size() + r.id.size() + tensor.size() + bytes + 40);
  PutBytes(out, 1, r.model_name);
  PutBytes(out, 2, "1");
  if (!r.id.empty()) PutBytes(out, 3, r.id);
  PutBytes(out, 5, tensor);
  // as Triton: an output written to shared memory leaves its raw contents empty
  std::string_view raw(reinterpret_cast<const char*>(values), r.out_region ? 0 : bytes);
  PutBytes(out, 6, raw);
  return out;
}

grpc::ByteBuffer ToBuffer(std::string&& bytes) {
  auto* owned = new std::string(std::move(bytes));
  grpc::Slice slice(owned->data(), owned->size(),
                    [](void* p) { delete static_cast<std::string*>(p); }, owned);
  return grpc::ByteBuffer(&slice, 1);
}

bool ConstantTimeEqual(std::string_view a, std::string_view b) {
  unsigned char diff = a.size() != b.size();
  for (size_t i = 0; i < a.size(); ++i) diff |= a[i] ^ b[i % std::max<size_t>(b.size(), 1)];
  return diff == 0;
}

std::string_view Strip(std::string_view s) {
  const char* space = " \t\n\r\v\f";
  size_t from = s.find_first_not_of(space);
  if (from == std::string_view::npos) return {};
  return s.substr(from, s.find_last_not_of(space) - from + 1);
}

class Front;

// ---- one downstream call ----

// Every call is a generic bidi stream here (unary calls are streams of one message on the wire). The call
// ends (Finish) when its reading is over, no engine answer is due, the upstream call (if any) is done and
// every answer is written; its status is the upstream call's, or OK. It frees itself when grpc and every
// engine answer and the upstream call are done with it (refs_).
class Call : public grpc::ServerGenericBidiReactor {
 public:
  Call(Front* front, grpc::GenericCallbackServerContext* ctx);
  void Start();
  void Drain();
  void AddRef() {
    std::lock_guard<std::mutex> lock(mu_);
    refs_++;
  }
  void Release();

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

  // From the upstream call.
  void UpstreamMessage(grpc::ByteBuffer&& message) { Send(std::move(message)); }
  void UpstreamDone(const grpc::Status& status);

 private:
  class Upstream;
  enum Kind { kUnary, kStream, kProxy };

  bool TryHot(const grpc::ByteBuffer& message);
  void HotDone(const HotRequest& r, const grpc::ByteBuffer& message, int64_t start, const float* out,
               bool ok);
  void Forward(grpc::ByteBuffer message);
  void Send(grpc::ByteBuffer&& message);
  void WriteNext();
  void MaybeFinish();

  Front* front_;
  grpc::GenericCallbackServerContext* ctx_;
  Kind kind_;
  bool hot_allowed_ = false;
  std::mutex mu_;
  grpc::ByteBuffer in_, writing_buffer_;
  std::deque<grpc::ByteBuffer> to_write_;
  bool writing_ = false, reads_over_ = false, finished_ = false, cancelled_ = false, upstream_done_ = false;
  bool upstream_closed_ = false;
  int64_t hot_in_flight_ = 0;
  int refs_ = 1;   // grpc's (until OnDone), each engine answer due, the upstream call
  Upstream* upstream_ = nullptr;
  grpc::Status upstream_status_;
  std::multimap<std::string, std::string> upstream_trailers_;
};

class Front {
 public:
  std::string private_address, token;
  bool has_token = false;
  int64_t max_request_bytes = 0;
  std::unordered_map<std::string, Model> models;
  std::unordered_map<int64_t, std::unique_ptr<FrontStats>> stats;   // by engine handle; filled before start
  ShmRegions regions;   // shared_memory.py's, mirrored
  std::atomic<bool> draining{false};
  std::atomic<int64_t> hot_answers{0};

  int Start(const std::string& host, int port, int64_t receive_limit, int max_connections, int64_t idle_ms);
  void Drain(double seconds);
  grpc::GenericStub& stub() { return *stub_; }

  void Track(Call* c) {
    std::lock_guard<std::mutex> lock(calls_mu_);
    calls_.insert(c);
  }
  void Untrack(Call* c) {
    std::lock_guard<std::mutex> lock(calls_mu_);
    calls_.erase(c);
  }
  bool Authorized(const grpc::GenericCallbackServerContext* ctx) const;

 private:
  class Service : public grpc::CallbackGenericService {
   public:
    explicit Service(Front* f) : front_(f) {}
    grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
      auto* call = new Call(front_, ctx);
      call->Start();
      return call;
    }

   private:
    Front* front_;
  };

  void Accept();
  bool UnderLimit();

  Service service_{this};
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<grpc::GenericStub> stub_;
  std::vector<int> listeners_;
  int wake_[2] = {-1, -1};
  int max_connections_ = 0;
  std::vector<std::pair<int, ino_t>> connections_;   // accepted sockets: descriptor, inode
  std::thread acceptor_;
  std::mutex calls_mu_;
  std::set<Call*> calls_;
};

// The forwarded call to the Python server: every message written to it in order, its answers back to the call.
// Its writes are started from other threads (the engine's, the client call's reactions), so it keeps grpc's hold
// until its last write op (WritesDone) is started: without it grpc finishes the call as soon as Python's status is
// in, and a WritesDone started after that finishes it a second time (a second OnDone, one call unref too many: the
// server aborted). The hold and the WritesDone go together, decided under mu_ while no write is in flight; a
// message after Close is dropped.
class Call::Upstream : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  Upstream(Call* call, Front* front) : call_(call) {
    for (const auto& [key, value] : call->ctx_->client_metadata()) {
      std::string k(key.data(), key.size());
      if (k.empty() || k[0] == ':' || k.rfind("grpc-", 0) == 0 || k == "user-agent" || k == "te" ||
          k == "content-type")
        continue;
      ctx_.AddMetadata(k, std::string(value.data(), value.size()));
    }
    if (call->ctx_->deadline() != std::chrono::system_clock::time_point::max())
      ctx_.set_deadline(call->ctx_->deadline());
    front->stub().PrepareBidiStreamingCall(&ctx_, call->ctx_->method(), grpc::StubOptions(), this);
    AddHold();   // before StartCall; removed with the WritesDone (Finish)
  }
  void Begin() {   // outside the call's lock: grpc may run callbacks on this thread
    StartRead(&in_);
    StartCall();
  }
  void Write(grpc::ByteBuffer&& message) {
    bool start;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closing_) return;   // closed (nothing more is forwarded then) or over: nobody reads it
      queue_.push_back(std::move(message));
      start = !writing_;
      writing_ = true;
    }
    if (start) Next();
  }
  void Close() {   // no more messages (after those queued)
    bool now;
    {
      std::lock_guard<std::mutex> lock(mu_);
      closing_ = true;
      now = !writing_ && !done_sent_;
      done_sent_ = done_sent_ || now;
    }
    if (now) Finish();
  }
  void Cancel() {
    ctx_.TryCancel();
    Close();
  }
  std::multimap<std::string, std::string> Trailers() {
    std::multimap<std::string, std::string> out;
    for (const auto& [k, v] : ctx_.GetServerTrailingMetadata())
      out.emplace(std::string(k.data(), k.size()), std::string(v.data(), v.size()));
    return out;
  }

  void OnReadDone(bool ok) override {
    if (!ok) {   // Python ended the call: write nothing more, let OnDone bring its status
      Close();
      return;
    }
    call_->UpstreamMessage(std::move(in_));
    in_.Clear();
    StartRead(&in_);
  }
  void OnWriteDone(bool ok) override {
    if (!ok) {   // the call failed (OnDone has its status): the queued messages go nowhere
      std::lock_guard<std::mutex> lock(mu_);
      queue_.clear();
      closing_ = true;
    }
    Next();
  }
  void OnDone(const grpc::Status& status) override { call_->UpstreamDone(status); }

 private:
  void Next() {
    bool write = false, done = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (queue_.empty()) {
        writing_ = false;
        done = closing_ && !done_sent_;
        done_sent_ = done_sent_ || done;
      } else {
        current_ = std::move(queue_.front());
        queue_.pop_front();
        write = true;
      }
    }
    if (write) StartWrite(&current_);
    else if (done) Finish();
  }

  void Finish() {   // the last write op, then the hold: grpc may end the call (and call OnDone) from here on
    StartWritesDone();
    RemoveHold();
  }

  Call* call_;
  grpc::ClientContext ctx_;
  grpc::ByteBuffer in_, current_;
  std::mutex mu_;
  std::deque<grpc::ByteBuffer> queue_;
  bool writing_ = false, closing_ = false, done_sent_ = false;
};

Call::Call(Front* front, grpc::GenericCallbackServerContext* ctx) : front_(front), ctx_(ctx) {
  const std::string& method = ctx->method();
  kind_ = method == kInferMethod ? kUnary : method == kStreamMethod ? kStream : kProxy;
  hot_allowed_ = kind_ != kProxy && !front->draining && front->Authorized(ctx);
  if (!hot_allowed_) kind_ = kProxy;   // Python answers it whole (its refusal, at once)
}

void Call::Start() {
  front_->Track(this);
  if (kind_ == kProxy) {   // at once: its answers may come before (or without) any message
    {
      std::lock_guard<std::mutex> lock(mu_);
      refs_++;
      upstream_ = new Upstream(this, front_);
    }
    upstream_->Begin();
  }
  StartRead(&in_);
}

void Call::OnReadDone(bool ok) {
  if (!ok) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      reads_over_ = true;
    }
    MaybeFinish();
    return;
  }
  grpc::ByteBuffer message(std::move(in_));
  in_.Clear();
  {   // counted in until it is submitted or forwarded: the call cannot end under it
    std::lock_guard<std::mutex> lock(mu_);
    hot_in_flight_++;
    refs_++;
  }
  if (!(hot_allowed_ && !front_->draining && TryHot(message))) Forward(std::move(message));
  bool more;
  {
    std::lock_guard<std::mutex> lock(mu_);
    hot_in_flight_--;
    more = kind_ != kUnary && !front_->draining && !finished_ && !reads_over_;
    reads_over_ = !more;
  }
  if (more) StartRead(&in_);
  else MaybeFinish();
  Release();
}

bool Call::TryHot(const grpc::ByteBuffer& message) {
  auto received = std::make_shared<Received>(message);
  const Received& rx = *received;
  if (!rx.ok() || static_cast<int64_t>(rx.size()) > front_->max_request_bytes) return false;
  // The fields before the tensor are small: scan a window of them, the tensor is copied once, from the slices.
  std::string head(std::min<size_t>(rx.size(), 4096), '\0');
  rx.Copy(0, head.size(), head.data());
  HotRequest r;
  std::string_view version, input, output;
  int inputs = 0, outputs = 0, raws = 0;
  size_t raw_len = 0;
  Scan s(head);
  while (!s.Done()) {
    uint64_t key;
    if (!s.Varint(key) || (key & 7) != 2) return false;
    if (key >> 3 == 7) {   // raw_input_contents: its length here, its bytes stay where they are
      uint64_t n;
      if (!s.Varint(n) || ++raws > 1) return false;
      r.raw_at = s.Offset(head.data());
      if (n > rx.size() - r.raw_at) return false;
      raw_len = n;
      if (r.raw_at + n != rx.size()) return false;   // not the last field: not the plain request
      break;
    }
    std::string_view bytes;
    if (!s.Bytes(bytes)) return false;   // a field past the window: not a plain request
    switch (key >> 3) {
      case 1: r.model_name = bytes; break;
      case 2: version = bytes; break;
      case 3: r.id = bytes; break;
      case 5: input = bytes, inputs++; break;
      case 6: output = bytes, outputs++; break;
      default: return false;   // request parameters, unknown fields
    }
  }
  if (inputs != 1 || outputs > 1 || !(version.empty() || version == "1")) return false;
  auto it = front_->models.find(r.model_name);
  if (it == front_->models.end()) return false;
  const Model& m = it->second;
  ShmParams in_shm, out_shm;
  if (!HotInput(input, m, r.rows, in_shm) || (outputs && !HotOutput(output, m, out_shm))) return false;
  int64_t bytes = r.rows * m.row_bytes;
  // A region that is not there, a tensor outside its region or of another size, an output region too small:
  // Python's errors (forwarded), as is an input over --max-request-bytes.
  std::shared_ptr<const ShmRegion> in_region;
  if (in_shm.region.empty()) {
    if (raws != 1 || static_cast<int64_t>(raw_len) != bytes) return false;
  } else {
    in_region = front_->regions.Find(in_shm.region, in_shm.offset, bytes);
    if (raws != 0 || !in_region || in_shm.byte_size != bytes || bytes > front_->max_request_bytes) return false;
  }
  r.model = &m;
  if (!out_shm.region.empty()) {
    r.out_region = front_->regions.Find(out_shm.region, out_shm.offset, out_shm.byte_size);
    r.out_at = out_shm.offset;
    if (!r.out_region || out_shm.byte_size < r.output_bytes()) return false;
  }
  bool check = m.engine->checks_finite32();
  Rows rows{nullptr, r.rows, nullptr, check};
  if (!in_region && r.rows < m.engine->fixed_batch()) {
    // Staged into the batch anyway: the engine copies the tensor from grpc's slices into its batch buffer (one
    // copy, not two) and checks it there; a NaN / Inf is refused by the engine and so forwarded to Python.
    rows.owner = received;
    rows.finite = false;
    rows.fill = [received, at = r.raw_at, bytes, check](void* dst) {
      received->Copy(at, bytes, dst);
      return !check || AllFinite32(dst, bytes / 4);
    };
  } else {
    size_t padded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    void* data = std::aligned_alloc(kAlignment, padded);
    if (!data) return false;
    rows.data = data;
    rows.owner = std::shared_ptr<void>(data, std::free);
    if (in_region ? !in_region->Read(in_shm.offset, bytes, data) : !rx.Copy(r.raw_at, raw_len, data))
      return false;   // the object was truncated: Python says so
    if (check && !AllFinite32(data, bytes / 4)) return false;   // Python refuses it, with its message
  }
  FrontStats& stats = *front_->stats.at(m.handle);
  {
    std::lock_guard<std::mutex> lock(mu_);
    hot_in_flight_++;
    refs_++;
  }
  stats.pending++;
  int64_t start = NowNs();
  bool taken = m.engine->Submit(rows, [this, r, message, start](const float* out, int64_t, bool,
                                                                 const std::string&) {
    HotDone(r, message, start, out, out != nullptr);
  }, /*wake=*/true);   // grpc hands messages over one callback at a time: no burst to gather
  if (!taken) {   // the engine is closed: Python answers (it knows why)
    stats.pending--;
    std::lock_guard<std::mutex> lock(mu_);
    hot_in_flight_--;
    refs_--;
    return false;
  }
  return true;
}

// On the engine's thread. A refused (NaN / Inf) or failed request is forwarded: Python runs it again and answers
// with its own status, message and failure count (one wording, one place), as the HTTP pump hands it back.
void Call::HotDone(const HotRequest& r, const grpc::ByteBuffer& message, int64_t start, const float* out,
                   bool ok) {
  FrontStats& stats = *front_->stats.at(r.model->handle);
  if (ok && r.out_region)   // an object truncated meanwhile: forwarded, Python says so
    ok = r.out_region->Write(r.out_at, out, r.output_bytes());
  if (ok) {
    std::string answer = InferResponse(r, out);
    if (kind_ == kStream) {
      std::string wrapped;
      wrapped.reserve(answer.size() + 8);
      PutBytes(wrapped, 2, answer);   // ModelStreamInferResponse.infer_response; error_message empty
      answer = std::move(wrapped);
    }
    stats.Answered(start);
    front_->hot_answers++;
    Send(ToBuffer(std::move(answer)));
  } else {
    Forward(message);
  }
  stats.pending--;
  {
    std::lock_guard<std::mutex> lock(mu_);
    hot_in_flight_--;
  }
  MaybeFinish();
  Release();
}

void Call::Forward(grpc::ByteBuffer message) {
  Upstream* up;
  bool begin = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (cancelled_ || upstream_done_ || upstream_closed_) return;   // nobody left to answer it
    if (!upstream_) {
      refs_++;
      upstream_ = new Upstream(this, front_);
      begin = true;
    }
    up = upstream_;
  }
  up->Write(std::move(message));
  if (begin) up->Begin();
}

void Call::Send(grpc::ByteBuffer&& message) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (cancelled_ || finished_) return;
    to_write_.push_back(std::move(message));
    if (writing_) return;
    writing_ = true;
  }
  WriteNext();
}

void Call::WriteNext() {
  bool write;
  {
    std::lock_guard<std::mutex> lock(mu_);
    write = !to_write_.empty() && !cancelled_;
    if (write) {
      writing_buffer_ = std::move(to_write_.front());
      to_write_.pop_front();
    } else {
      writing_ = false;
      to_write_.clear();
    }
  }
  if (write) StartWrite(&writing_buffer_);
  else MaybeFinish();
}

void Call::OnWriteDone(bool ok) {
  if (!ok) {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
  }
  WriteNext();
}

void Call::UpstreamDone(const grpc::Status& status) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    upstream_status_ = status;
    upstream_trailers_ = upstream_->Trailers();
    upstream_done_ = true;
  }
  MaybeFinish();
  Release();   // the upstream call's reference; it is deleted with the call
}

// Called after every change: closes the upstream call once nothing more can be forwarded to it, and ends the call
// once nothing more can be answered (an upstream call that ended ends it: Python ended the stream).
void Call::MaybeFinish() {
  grpc::Status status;
  Upstream* close = nullptr;
  bool finish = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_) return;
    bool settled = (reads_over_ || upstream_done_) && !hot_in_flight_;
    if (upstream_ && !upstream_closed_ && !upstream_done_ && settled && !cancelled_) {
      upstream_closed_ = true;
      close = upstream_;
    }
    if (cancelled_) {
      finish = !writing_;
      status = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
    } else if (settled && (!upstream_ || upstream_done_) && !writing_ && to_write_.empty()) {
      finish = true;
      if (upstream_) {
        status = upstream_status_;
        for (const auto& [k, v] : upstream_trailers_) ctx_->AddTrailingMetadata(k, v);
      }
    }
    finished_ = finish;
  }
  if (close) close->Close();
  if (finish) Finish(status);
}

void Call::OnCancel() {
  Upstream* up;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    up = upstream_done_ ? nullptr : upstream_;
  }
  if (up) up->Cancel();
  MaybeFinish();
}

void Call::Drain() {   // a stream stops reading, answers what it took and ends (grpc_service.py does the same)
  if (kind_ != kStream) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    reads_over_ = true;
  }
  MaybeFinish();
}

void Call::OnDone() {
  front_->Untrack(this);
  Release();
}

void Call::Release() {
  bool last;
  {
    std::lock_guard<std::mutex> lock(mu_);
    last = --refs_ == 0;
  }
  if (last) {
    delete upstream_;
    delete this;
  }
}

// ---- the server ----

bool Front::Authorized(const grpc::GenericCallbackServerContext* ctx) const {
  if (!has_token) return true;
  std::string_view header;   // the last one, as dict(invocation_metadata()) keeps it
  for (const auto& [key, value] : ctx->client_metadata())
    if (std::string_view(key.data(), key.size()) == "authorization")
      header = std::string_view(value.data(), value.size());
  size_t space = header.find(' ');   // str.partition(" ")
  std::string_view scheme = header.substr(0, space);
  std::string_view value = space == std::string_view::npos ? "" : header.substr(space + 1);
  std::string lower(scheme);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  bool ok = ConstantTimeEqual(Strip(value), token);
  return lower == "bearer" && ok;
}

int Bind(const std::string& host, int port, std::vector<int>& fds, std::string& error) {
  addrinfo hints{}, *found = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), std::to_string(port).c_str(), &hints, &found);
  if (rc != 0) {
    error = gai_strerror(rc);
    return 0;
  }
  for (addrinfo* a = found; a; a = a->ai_next) {
    int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (a->ai_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (port) {   // every address on the port the first one got
      if (a->ai_family == AF_INET) reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_port = htons(port);
      else reinterpret_cast<sockaddr_in6*>(a->ai_addr)->sin6_port = htons(port);
    }
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 1024) != 0) {
      error = std::strerror(errno);
      close(fd);
      continue;
    }
    if (!port) {
      sockaddr_storage bound{};
      socklen_t len = sizeof bound;
      getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
      port = ntohs(bound.ss_family == AF_INET ? reinterpret_cast<sockaddr_in*>(&bound)->sin_port
                                              : reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port);
    }
    fds.push_back(fd);
  }
  freeaddrinfo(found);
  return fds.empty() ? 0 : port;
}

int Front::Start(const std::string& host, int port, int64_t receive_limit, int max_connections, int64_t idle_ms) {
  std::string error;
  port = Bind(host, port, listeners_, error);
  if (!port) throw std::runtime_error(error);
  max_connections_ = max_connections;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  channel_ = grpc::CreateCustomChannel(private_address, grpc::InsecureChannelCredentials(), args);
  stub_ = std::make_unique<grpc::GenericStub>(channel_);
  grpc::ServerBuilder builder;
  builder.SetMaxReceiveMessageSize(static_cast<int>(receive_limit));
  builder.SetMaxSendMessageSize(-1);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS, static_cast<int>(idle_ms));
  builder.RegisterCallbackGenericService(&service_);
  server_ = builder.BuildAndStart();
  if (!server_) throw std::runtime_error("the gRPC server did not start");
  if (pipe2(wake_, O_CLOEXEC) != 0) throw std::runtime_error("pipe: " + std::string(std::strerror(errno)));
  acceptor_ = std::thread([this] { Accept(); });
  return port;
}

// Open accepted sockets: those whose descriptor still names the socket accepted (grpc closes its own).
bool Front::UnderLimit() {
  auto gone = [](const std::pair<int, ino_t>& c) {
    struct stat st {};
    return fstat(c.first, &st) != 0 || !S_ISSOCK(st.st_mode) || st.st_ino != c.second;
  };
  connections_.erase(std::remove_if(connections_.begin(), connections_.end(), gone), connections_.end());
  return static_cast<int>(connections_.size()) < max_connections_;
}

void Front::Accept() {
  std::vector<pollfd> polls;
  for (int fd : listeners_) polls.push_back({fd, POLLIN, 0});
  polls.push_back({wake_[0], POLLIN, 0});
  while (true) {
    if (poll(polls.data(), polls.size(), -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (polls.back().revents) break;
    for (size_t i = 0; i + 1 < polls.size(); ++i) {
      if (!(polls[i].revents & POLLIN)) continue;
      int fd = accept4(polls[i].fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) continue;
      if (!UnderLimit()) {
        close(fd);
        continue;
      }
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      struct stat st {};
      fstat(fd, &st);
      connections_.emplace_back(fd, st.st_ino);
      grpc::AddInsecureChannelFromFd(server_.get(), fd);
    }
  }
}

void Front::Drain(double seconds) {
  draining = true;
  if (wake_[1] >= 0 && write(wake_[1], "x", 1) != 1) std::perror("tvmzoo grpc front: wake");
  if (acceptor_.joinable()) acceptor_.join();
  for (int fd : listeners_) close(fd);
  listeners_.clear();
  std::vector<Call*> calls;
  {
    std::lock_guard<std::mutex> lock(calls_mu_);   // a tracked call has not run OnDone's Release yet
    calls.assign(calls_.begin(), calls_.end());
    for (Call* c : calls) c->AddRef();
  }
  for (Call* c : calls) {
    c->Drain();
    c->Release();
  }
  auto deadline = std::chrono::system_clock::now() + std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6));
  if (server_) server_->Shutdown(deadline);
}

// Fronts by handle; never destroyed (grpc's threads may still run a finished call's last callbacks at exit).
std::mutex fronts_mu;
std::vector<Front*> fronts;

Front* Get(int64_t handle) {
  std::lock_guard<std::mutex> lock(fronts_mu);
  if (handle < 1 || handle > static_cast<int64_t>(fronts.size())) TVM_FFI_THROW(ValueError) << "unknown front";
  return fronts[handle - 1];
}

using EngineLookup = Engine* (*)(int64_t);

EngineLookup FindEngines(const std::string& library) {
  void* lib = dlopen(library.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (!lib) TVM_FFI_THROW(RuntimeError) << "the native engine module " << library << " is not loaded";
  auto lookup = reinterpret_cast<EngineLookup>(dlsym(lib, "_ZN6tvmzoo16EngineFromHandleEl"));
  if (!lookup) TVM_FFI_THROW(RuntimeError) << library << " has no tvmzoo::EngineFromHandle";
  return lookup;
}

}  // namespace

int64_t FrontCreate(ffi::String private_address, int64_t max_request_bytes, bool has_token, ffi::String token) {
  auto* f = new Front;
  f->private_address = std::string(private_address);
  f->max_request_bytes = max_request_bytes;
  f->has_token = has_token;
  f->token = std::string(token);
  std::lock_guard<std::mutex> lock(fronts_mu);
  fronts.push_back(f);
  return fronts.size();
}

// False: the model's rows are not what its datatype sends (a float16 module takes FP32 converted): Python answers.
bool FrontAddModel(int64_t front, ffi::String engine_library, int64_t engine, ffi::String name,
                   ffi::String input_name, ffi::String datatype, ffi::Shape row_shape, int64_t item_bytes,
                   ffi::String output_name) {
  Front* f = Get(front);
  Model m;
  m.engine = FindEngines(std::string(engine_library))(engine);
  if (!m.engine) TVM_FFI_THROW(ValueError) << "unknown engine " << engine;
  m.handle = engine;
  m.input_name = std::string(input_name);
  m.datatype = std::string(datatype);
  m.output_name = std::string(output_name);
  m.row_shape.assign(row_shape.begin(), row_shape.end());
  int64_t elems = 1;
  for (int64_t d : m.row_shape) elems *= d;
  m.row_bytes = elems * item_bytes;
  if (m.row_bytes != m.engine->row_bytes()) return false;
  m.classes = m.engine->output_row_floats();
  f->stats.emplace(engine, std::make_unique<FrontStats>());
  f->models[std::string(name)] = std::move(m);
  return true;
}

int64_t FrontStart(int64_t front, ffi::String host, int64_t port, int64_t receive_limit, int64_t max_connections,
                   int64_t idle_ms) {
  std::string error;
  try {
    return Get(front)->Start(std::string(host), static_cast<int>(port), receive_limit,
                             static_cast<int>(max_connections), idle_ms);
  } catch (const std::runtime_error& exc) {
    error = exc.what();
  }
  TVM_FFI_THROW(RuntimeError) << error;
}

// success, summed request ns, pending, last success (unix ms): what Metrics.count_elsewhere reads.
ffi::Array<int64_t> FrontStats(int64_t front, int64_t engine) {
  Front* f = Get(front);
  auto it = f->stats.find(engine);
  if (it == f->stats.end()) return {0, 0, 0, 0};
  return it->second->Read();
}

// Stop accepting, end the streams, let every call finish (up to `seconds`; then grpc cancels them). Blocks.
void FrontDrain(int64_t front, double seconds) { Get(front)->Drain(seconds); }

// shared_memory.py's registrations, mirrored: the object's descriptor (duplicated here) and the region's place.
void FrontAddRegion(int64_t front, ffi::String name, int64_t fd, int64_t offset, int64_t byte_size) {
  std::string error = Get(front)->regions.Add(std::string(name), static_cast<int>(fd), offset, byte_size);
  if (!error.empty()) TVM_FFI_THROW(RuntimeError) << error;
}

void FrontRemoveRegion(int64_t front, ffi::String name) { Get(front)->regions.Remove(std::string(name)); }

}  // namespace tvmzoo

TVM_FFI_DLL_EXPORT_TYPED_FUNC(grpc_front_create, tvmzoo::FrontCreate);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(grpc_front_add_model, tvmzoo::FrontAddModel);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(grpc_front_start, tvmzoo::FrontStart);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(grpc_front_stats, tvmzoo::FrontStats);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(grpc_front_drain, tvmzoo::FrontDrain);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(grpc_front_add_region, tvmzoo::FrontAddRegion);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(grpc_front_remove_region, tvmzoo::FrontRemoveRegion);
