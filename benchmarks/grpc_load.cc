// grpc_load: a closed-loop gRPC load generator for `tvmzoo serve` (KServe v2 / Triton protocol), the gRPC
// counterpart of wrk for benchmarks/serve_perf.py (built and driven by benchmarks/serve_grpc_cpp.py).
//
// Each of --concurrency slots sends one prebuilt, serialized ModelInferRequest (--request FILE) and sends it
// again when its answer is in: unary ModelInfer calls, or with --stream one ModelStreamInfer stream per slot
// (as perf_analyzer --streaming). No generated protobuf code: grpc::GenericStub sends the bytes as they are,
// and a small protobuf wire scan checks every answer (status OK, an empty error_message on the stream, the
// request's id, the first output's size matching its shape, and with --top its first row's arg max). With
// --output-in-shm the request asks its output in a system shared memory region (perf_analyzer --shared-memory
// system): the answer's raw output must then be empty, and the caller checks the region.
// One thread drives every call through a completion queue; the slots share --channels connections (default 1, as
// clients of tritonclient's cached channel do), slot i on connection i % channels.
//
// Prints one JSON line: requests answered right within the measured --seconds (after --warmup), errors (the
// whole run, warm-up included), the first error's message, latency percentiles and every latency (us), and
// this process's CPU time over the measured part (getrusage, gRPC's own threads included).
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
const char* const kInfer = "/inference.GRPCInferenceService/ModelInfer";
const char* const kStream = "/inference.GRPCInferenceService/ModelStreamInfer";

struct Options {
  std::string address, request_file;
  int concurrency = 1;
  int channels = 1;
  double seconds = 4.0, warmup = 1.0;
  bool stream = false, output_in_shm = false;
  long top = -1;  // expected arg max of the first output row; -1: not checked
};

[[noreturn]] void fail(const std::string& message) {
  std::cerr << "grpc_load: " << message << "\n";
  std::exit(2);
}

// ---- protobuf wire format: just enough to read the fields the checks need ----
struct Field {
  uint32_t number = 0, wire = 0;
  uint64_t value = 0;      // varint
  std::string_view bytes;  // length-delimited
};

class Wire {
 public:
  explicit Wire(std::string_view data) : p_(data.data()), end_(data.data() + data.size()) {}
  bool bad() const { return bad_; }
  bool done() const { return p_ >= end_ || bad_; }

  bool next(Field& f) {
    if (done()) return false;
    uint64_t key = varint();
    f.number = static_cast<uint32_t>(key >> 3);
    f.wire = static_cast<uint32_t>(key & 7);
    if (f.wire == 0) {
      f.value = varint();
    } else if (f.wire == 1 || f.wire == 5) {
      skip(f.wire == 1 ? 8 : 4);
    } else if (f.wire == 2) {
      uint64_t n = varint();
      if (n > static_cast<uint64_t>(end_ - p_)) bad_ = true;
      if (bad_) return false;
      f.bytes = std::string_view(p_, n);
      p_ += n;
    } else {
      bad_ = true;
    }
    return !bad_;
  }

  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && p_ < end_; shift += 7) {
      auto b = static_cast<uint8_t>(*p_++);
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    bad_ = true;
    return 0;
  }

 private:
  void skip(size_t n) {
    if (n > static_cast<size_t>(end_ - p_)) bad_ = true; else p_ += n;
  }
  const char* p_;
  const char* end_;
  bool bad_ = false;
};

// The first length-delimited field `number` of a message (empty if none).
std::string_view field_bytes(std::string_view message, uint32_t number, bool* found = nullptr) {
  Wire w(message);
  Field f;
  while (w.next(f)) {
    if (f.number == number && f.wire == 2) {
      if (found) *found = true;
      return f.bytes;
    }
  }
  if (found) *found = false;
  return {};
}

// InferOutputTensor.shape (field 3, repeated int64: packed or not).
std::vector<uint64_t> output_shape(std::string_view tensor) {
  std::vector<uint64_t> shape;
  Wire w(tensor);
  Field f;
  while (w.next(f)) {
    if (f.number != 3) continue;
    if (f.wire == 0) shape.push_back(f.value);
    if (f.wire != 2) continue;
    Wire packed(f.bytes);
    while (!packed.done()) shape.push_back(packed.varint());
  }
  return shape;
}

// ModelInferResponse: id = 3, outputs = 5, raw_output_contents = 6. "" when the answer is right.
std::string check_response(std::string_view message, std::string_view id, long top, bool output_in_shm) {
  bool has_output = false, has_raw = false;
  std::string_view got_id = field_bytes(message, 3);
  std::string_view output = field_bytes(message, 5, &has_output);
  std::string_view raw = field_bytes(message, 6, &has_raw);
  if (got_id != id) return "answer id '" + std::string(got_id) + "' for request '" + std::string(id) + "'";
  if (!has_output || !has_raw) return "no output tensor or raw_output_contents in the answer";
  std::vector<uint64_t> shape = output_shape(output);
  uint64_t count = 1;
  for (uint64_t d : shape) count *= d;
  if (output_in_shm)
    return shape.empty() || !raw.empty() ? "an output asked in shared memory came in the answer" : "";
  if (shape.empty() || raw.size() != 4 * count)
    return "output of " + std::to_string(raw.size()) + " bytes for " + std::to_string(count) + " FP32 values";
  if (top >= 0) {
    size_t row = count / shape[0];
    std::vector<float> first(row);
    std::memcpy(first.data(), raw.data(), 4 * row);
    auto best = std::max_element(first.begin(), first.end()) - first.begin();
    if (best != top) return "top class " + std::to_string(best) + ", expected " + std::to_string(top);
  }
  return {};
}

// ModelStreamInferResponse: error_message = 1, infer_response = 2.
std::string check_stream_response(std::string_view message, std::string_view id, long top, bool output_in_shm) {
  std::string_view error = field_bytes(message, 1);
  if (!error.empty()) return "stream error_message: " + std::string(error);
  return check_response(field_bytes(message, 2), id, top, output_in_shm);
}

std::string describe(const grpc::Status& status) {
  static const char* const names[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                      "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                      "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                      "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  int code = status.error_code();
  std::string name = code >= 0 && code <= 16 ? names[code] : std::to_string(code);
  return name + ": " + status.error_message();
}

std::string flatten(const grpc::ByteBuffer& buffer) {
  grpc::Slice slice;
  if (!buffer.DumpToSingleSlice(&slice).ok()) return {};
  return std::string(reinterpret_cast<const char*>(slice.begin()), slice.size());
}

// ---- the load ----
enum class Op { kUnary, kStart, kWrite, kRead, kWritesDone, kFinish };

struct Slot;
struct Tag {
  Slot* slot;
  Op op;
};

struct Slot {
  Tag tags[6];
  std::unique_ptr<grpc::ClientContext> context;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> unary;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> stream;
  grpc::ByteBuffer response;
  grpc::Status status;
  Clock::time_point sent;
  int pending = 0;          // stream: the write and the read of the request in flight
  bool broken = false;      // stream: a write or read failed, Finish tells why
  bool closing = false;     // stream: WritesDone sent, the slot ends with Finish
  bool idle = false;
  std::string verdict;      // stream: the check of the last answer read
  Tag* tag(Op op) { return &tags[static_cast<int>(op)]; }
};

class Load {
 public:
  Load(const Options& options, const std::vector<std::shared_ptr<grpc::Channel>>& channels, std::string request)
      : opt_(options), request_bytes_(std::move(request)), id_(field_bytes(request_bytes_, 3)),
        slots_(options.concurrency) {
    for (const auto& channel : channels) stubs_.push_back(std::make_unique<grpc::GenericStub>(channel));
    grpc::Slice slice(request_bytes_.data(), request_bytes_.size());
    request_ = grpc::ByteBuffer(&slice, 1);
    for (auto& s : slots_)
      for (int op = 0; op < 6; ++op) s.tags[op] = Tag{&s, static_cast<Op>(op)};
  }

  void run() {
    auto begin = Clock::now();
    start_ = begin + seconds(opt_.warmup);
    end_ = start_ + seconds(opt_.seconds);
    for (auto& s : slots_) opt_.stream ? open(s) : send_unary(s);
    bool started = false, ended = false;
    int idle = 0;
    while (idle < static_cast<int>(slots_.size())) {
      void* raw_tag;
      bool ok;
      bool draining = ended;
      auto deadline = !started ? start_ : !ended ? end_ : Clock::now() + std::chrono::seconds(60);
      auto got = cq_.AsyncNext(&raw_tag, &ok, std::chrono::system_clock::now() + (deadline - Clock::now()));
      if (got == grpc::CompletionQueue::SHUTDOWN) fail("completion queue shut down");
      if (!started && Clock::now() >= start_) started = true, cpu(&cpu_start_, &user_start_);
      if (!ended && Clock::now() >= end_) ended = true, cpu(&cpu_end_, &user_end_);
      if (got == grpc::CompletionQueue::TIMEOUT) {
        if (draining) fail("no answer for 60 s after the run");
        continue;
      }
      auto* tag = static_cast<Tag*>(raw_tag);
      handle(*tag->slot, tag->op, ok);
      if (tag->slot->idle) ++idle;
    }
    cq_.Shutdown();
    void* raw_tag;
    bool ok;
    while (cq_.Next(&raw_tag, &ok)) {}
  }

  void report() const {
    std::vector<int64_t> sorted = latencies_us_;
    std::sort(sorted.begin(), sorted.end());
    std::ostringstream out;
    out << "{\"requests\": " << latencies_us_.size() << ", \"errors\": " << errors_
        << ", \"first_error\": \"" << json_escape(first_error_) << "\", \"seconds\": " << opt_.seconds
        << ", \"cpu_s\": " << cpu_end_ - cpu_start_ << ", \"user_s\": " << user_end_ - user_start_;
    for (double q : {50.0, 90.0, 99.0}) {
      out << ", \"p" << q << "_ms\": ";
      if (sorted.empty()) out << "null"; else out << percentile(sorted, q) / 1e3;
    }
    out << ", \"latencies_us\": [";
    for (size_t i = 0; i < latencies_us_.size(); ++i) out << (i ? "," : "") << latencies_us_[i];
    out << "]}\n";
    std::cout << out.str() << std::flush;
  }

 private:
  static Clock::duration seconds(double s) {
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
  }
  static void cpu(double* total, double* user) {  // this process, all its threads (gRPC's own too)
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    *user = u.ru_utime.tv_sec + 1e-6 * u.ru_utime.tv_usec;
    *total = *user + u.ru_stime.tv_sec + 1e-6 * u.ru_stime.tv_usec;
  }
  static double percentile(const std::vector<int64_t>& sorted, double q) {  // numpy's linear interpolation
    double rank = q / 100 * (sorted.size() - 1);
    size_t lo = static_cast<size_t>(rank);
    size_t hi = std::min(lo + 1, sorted.size() - 1);
    return sorted[lo] + (rank - lo) * (sorted[hi] - sorted[lo]);
  }
  static std::string json_escape(const std::string& text) {
    std::string out;
    for (unsigned char c : text) {
      if (c == '"' || c == '\\') out += '\\', out += static_cast<char>(c);
      else if (c < 0x20) {
        char code[8];
        std::snprintf(code, sizeof code, "\\u%04x", c);
        out += code;
      } else out += static_cast<char>(c);
    }
    return out;
  }

  std::unique_ptr<grpc::ClientContext> new_context(double seconds_left) {
    auto context = std::make_unique<grpc::ClientContext>();
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::duration_cast<
                          std::chrono::system_clock::duration>(std::chrono::duration<double>(seconds_left)));
    return context;
  }

  void send_unary(Slot& s) {
    s.context = new_context(60);
    s.unary = stub(s).PrepareUnaryCall(s.context.get(), kInfer, request_, &cq_);
    s.sent = Clock::now();
    s.unary->StartCall();
    s.unary->Finish(&s.response, &s.status, s.tag(Op::kUnary));
  }

  void open(Slot& s) {
    s.context = new_context(opt_.warmup + opt_.seconds + 60);
    s.broken = s.closing = false;
    s.stream = stub(s).PrepareCall(s.context.get(), kStream, &cq_);
    s.stream->StartCall(s.tag(Op::kStart));
  }

  void send_stream(Slot& s) {
    s.pending = 2;
    s.sent = Clock::now();
    s.stream->Write(request_, s.tag(Op::kWrite));
    s.stream->Read(&s.response, s.tag(Op::kRead));
  }

  void answered(Slot& s, const std::string& error) {
    auto now = Clock::now();
    if (!error.empty()) {
      if (errors_++ == 0) first_error_ = error;
    } else if (now >= start_ && now <= end_) {
      latencies_us_.push_back(std::chrono::duration_cast<std::chrono::microseconds>(now - s.sent).count());
    }
  }

  void handle(Slot& s, Op op, bool ok) {
    if (op == Op::kUnary) {
      answered(s, !s.status.ok() ? describe(s.status)
                                 : check_response(flatten(s.response), id_, opt_.top, opt_.output_in_shm));
      if (Clock::now() < end_) send_unary(s); else s.idle = true;
      return;
    }
    if (op == Op::kStart) {
      if (ok) return send_stream(s);
      s.broken = true;
      return s.stream->Finish(&s.status, s.tag(Op::kFinish));
    }
    if (op == Op::kWrite || op == Op::kRead) {   // a request's write and read, in either order
      if (!ok) s.broken = true;
      else if (op == Op::kRead)
        s.verdict = check_stream_response(flatten(s.response), id_, opt_.top, opt_.output_in_shm);
      if (--s.pending > 0) return;
      if (s.broken) return s.stream->Finish(&s.status, s.tag(Op::kFinish));
      answered(s, s.verdict);
      if (Clock::now() < end_) return send_stream(s);
      s.closing = true;
      return s.stream->WritesDone(s.tag(Op::kWritesDone));
    }
    if (op == Op::kWritesDone) return s.stream->Finish(&s.status, s.tag(Op::kFinish));
    // kFinish: the stream is over
    if (s.broken || !s.status.ok())
      answered(s, "stream ended: " + describe(s.status));
    if (!s.closing && Clock::now() < end_) return open(s);
    s.idle = true;
  }

  Options opt_;
  grpc::GenericStub& stub(const Slot& s) { return *stubs_[(&s - slots_.data()) % stubs_.size()]; }
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs_;
  std::string request_bytes_;
  std::string id_;
  grpc::ByteBuffer request_;
  grpc::CompletionQueue cq_;
  std::vector<Slot> slots_;
  Clock::time_point start_, end_;
  double cpu_start_ = 0, cpu_end_ = 0, user_start_ = 0, user_end_ = 0;
  std::vector<int64_t> latencies_us_;
  int64_t errors_ = 0;
  std::string first_error_;
};

Options parse(int argc, char** argv) {
  Options o;
  auto number = [](const std::string& name, const char* text) {
    char* end = nullptr;
    double v = std::strtod(text, &end);
    if (end == text || *end || !std::isfinite(v) || v < 0) fail(name + " wants a number >= 0, got '" + text + "'");
    return v;
  };
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--stream") { o.stream = true; continue; }
    if (arg == "--output-in-shm") { o.output_in_shm = true; continue; }
    if (i + 1 >= argc) fail("missing value after " + arg);
    const char* value = argv[++i];
    if (arg == "--address") o.address = value;
    else if (arg == "--request") o.request_file = value;
    else if (arg == "--concurrency") o.concurrency = static_cast<int>(number(arg, value));
    else if (arg == "--channels") o.channels = static_cast<int>(number(arg, value));
    else if (arg == "--seconds") o.seconds = number(arg, value);
    else if (arg == "--warmup") o.warmup = number(arg, value);
    else if (arg == "--top") o.top = static_cast<long>(number(arg, value));
    else fail("unknown option " + arg);
  }
  if (o.address.empty() || o.request_file.empty() || o.concurrency < 1 || o.channels < 1)
    fail("usage: grpc_load --address HOST:PORT --request FILE [--concurrency N >= 1] [--seconds S] "
         "[--warmup S] [--stream] [--channels N >= 1] [--top CLASS] [--output-in-shm]");
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  Options options = parse(argc, argv);
  std::ifstream file(options.request_file, std::ios::binary);
  if (!file) fail("cannot read the request file " + options.request_file);
  std::string request((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (int i = 0; i < options.channels; ++i) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);   // a connection of its own
    auto channel = grpc::CreateCustomChannel(options.address, grpc::InsecureChannelCredentials(), args);
    if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10)))
      fail("no gRPC server at " + options.address + " within 10 s");
    channels.push_back(channel);
  }
  Load load(options, channels, std::move(request));
  load.run();
  load.report();
  return 0;
}
