// A model's dynamic batcher in C++: the same policy as tvmzoo/run/serve/batcher.py (DynamicBatcher) -- read its
// docstrings for the why of each rule (Arrivals, Lanes, the wake-one rule, flush / close, the warm-up run) --
// with the instances' threads, staging, the NaN / Inf check and the per-batch statistics off the GIL.
// Requests come from C++ (Engine::Submit: the HTTP pump) or from Python (engine_submit); a batch's Python
// requests are handed back by one call of the engine's Python callback.
#include "engine.h"
#include "finite.h"

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tvmzoo {
namespace {

namespace ffi = tvm::ffi;
using Clock = std::chrono::steady_clock;
constexpr size_t kAlignment = 64;  // TVM reads an input in place only when its data is aligned to this
constexpr int kOneCorePerThread = -2;  // TVM's ThreadGroup::AffinityMode::kSpecifyOneCorePerThread

double Micros(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double, std::micro>(to - from).count();
}

// How many rows the next batch waits for (batcher.py Arrivals).
struct Arrivals {
  int64_t max_batch;
  int64_t expected;
  int64_t peak = 0;
  explicit Arrivals(int64_t max) : max_batch(max), expected(max) {}
  void Submitted(int64_t in_flight_rows) { peak = std::max(peak, in_flight_rows); }
  void Taken() {
    expected = std::min(max_batch, std::max<int64_t>(peak, 1));
    peak = 0;
  }
};

// threads.instance_cores: consecutive blocks of `threads`, wrapping.
std::vector<int> InstanceCores(int index, int threads, const std::vector<int>& cores) {
  std::vector<int> out;
  for (int k = 0; k < threads; ++k) out.push_back(cores[(index * threads + k) % cores.size()]);
  return out;
}

// One instance's cores in adaptive mode (batcher.py Lanes).
struct Lanes {
  std::vector<int> narrow, wide;
  static Lanes Of(int index, int instances, const std::vector<int>& cores) {
    Lanes lanes;
    lanes.narrow = InstanceCores(index, std::max<int>(1, cores.size() / instances), cores);
    lanes.wide = lanes.narrow;
    for (int c : cores)
      if (std::find(lanes.narrow.begin(), lanes.narrow.end(), c) == lanes.narrow.end()) lanes.wide.push_back(c);
    return lanes;
  }
};

void PinThisThreadPool(const std::vector<int>& cores) {
  static const ffi::Function configure = ffi::Function::GetGlobalRequired("runtime.config_threadpool");
  ffi::Array<ffi::String> names;
  for (int c : cores) names.push_back(std::to_string(c));
  configure(kOneCorePerThread, static_cast<int>(cores.size()), names);
}

struct Pending {
  Rows rows;
  Done done;                 // C++ submitters
  int64_t ticket = -1;       // Python submitters: handed back through the engine's callback
  Clock::time_point enqueued = Clock::now();
};

// A tensor over memory the engine owns or borrows: the VM reads the batch where it is.
struct Borrowed {
  void AllocData(DLTensor* tensor, void* data) { tensor->data = data; }
  void FreeData(DLTensor*) {}
};

struct AlignedFloats {  // a float32 tensor's own memory (the outputs handed to Python)
  void AllocData(DLTensor* tensor) {
    size_t bytes = ffi::GetDataSize(*tensor);
    tensor->data = std::aligned_alloc(kAlignment, (std::max<size_t>(bytes, 1) + kAlignment - 1) / kAlignment * kAlignment);
    if (tensor->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<uint8_t, FreeDeleter>;

Buffer AlignedZeros(size_t bytes) {
  bytes = (std::max<size_t>(bytes, 1) + kAlignment - 1) / kAlignment * kAlignment;
  Buffer buffer(static_cast<uint8_t*>(std::aligned_alloc(kAlignment, bytes)));
  if (!buffer) throw std::bad_alloc();
  std::memset(buffer.get(), 0, bytes);
  return buffer;
}

bool Aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kAlignment == 0; }

// numpy's float16 -> float32 (exact; NaN payloads kept).
float HalfToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0 && mant == 0) {
    bits = sign;
  } else if (exp == 0) {  // subnormal: normalize
    int e = 113;
    while (!(mant & 0x400)) {
      mant <<= 1;
      --e;
    }
    bits = sign | (static_cast<uint32_t>(e) << 23) | ((mant & 0x3ff) << 13);
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float Bf16ToFloat(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Non-finite values among `count` elements: how many, and the first one's index (-1: none).
std::pair<int64_t, int64_t> NonFinite(const uint8_t* data, int64_t count, DLDataType dtype) {
  // the common case, none: counted without a branch, then found only when there are some
  if (dtype.code == kDLFloat && dtype.bits == 32 && reinterpret_cast<uintptr_t>(data) % 4 == 0 &&
      AllFinite32(data, count))
    return {0, -1};
  int64_t bad = 0, first = -1;
  auto scan = [&](auto word, auto mask) {
    using Word = decltype(word);
    for (int64_t i = 0; i < count; ++i) {
      Word w;
      std::memcpy(&w, data + i * sizeof(Word), sizeof(Word));
      if ((w & mask) == mask) {
        if (bad++ == 0) first = i;
      }
    }
  };
  if (dtype.code == kDLFloat && dtype.bits == 32) scan(uint32_t{}, uint32_t{0x7F800000u});
  else if (dtype.code == kDLFloat && dtype.bits == 64) scan(uint64_t{}, uint64_t{0x7FF0000000000000ull});
  else if (dtype.code == kDLFloat && dtype.bits == 16) scan(uint16_t{}, uint16_t{0x7C00});
  else if (dtype.code == kDLBfloat && dtype.bits == 16) scan(uint16_t{}, uint16_t{0x7F80});
  return {bad, first};
}

std::string ErrorText(const std::exception& exc) {
  if (auto* error = dynamic_cast<const ffi::Error*>(&exc)) return error->kind() + ": " + error->message();
  return exc.what();
}

struct Config {
  std::string name;
  std::vector<int64_t> row_shape;   // one row (the input without its batch axis)
  DLDataType dtype;
  int64_t fixed_batch;              // the build's batch; 0: any
  int64_t max_batch;
  double max_delay_s;
  int64_t threads;                  // fixed threads per instance (reported in the threads histogram); 0: adaptive
  std::vector<int> cores;           // adaptive: the cores shared out; fixed: instance i's pool on InstanceCores
  std::string check_input;          // the input's name for the NaN / Inf check; empty: no check
  int64_t output_row_floats;
  std::vector<double> bounds;       // histogram bucket bounds (the last: +inf)
};

struct Stats {
  double queue_us = 0, input_us = 0, infer_us = 0, output_us = 0, inference_count = 0, exec_count = 0;
  std::vector<double> batch_counts, thread_counts;
  double batch_sum = 0, thread_sum = 0;
};

// One model instance: its VM function and its reused aligned batch buffer (CompiledModel.stage).
struct Instance {
  ffi::Function main;
  Buffer rows;
  int64_t capacity = 0;    // rows of `rows`
  int64_t dirty = 0;       // leading rows of `rows` that may be non-zero
  std::vector<float> out;  // a batch's outputs as float32
  std::condition_variable wake;
  std::thread thread;
};

class EngineImpl : public Engine {
 public:
  EngineImpl(Config config, std::vector<ffi::Function> mains, ffi::Function on_batch, ffi::Function on_log)
      : cfg_(std::move(config)), on_batch_(std::move(on_batch)), on_log_(std::move(on_log)),
        arrivals_(cfg_.max_batch) {
    row_elems_ = 1;
    for (int64_t d : cfg_.row_shape) row_elems_ *= d;
    row_bytes_ = row_elems_ * ((cfg_.dtype.bits * cfg_.dtype.lanes + 7) / 8);
    stats_.batch_counts.assign(cfg_.bounds.size(), 0);
    stats_.thread_counts.assign(cfg_.bounds.size(), 0);
    for (auto& main : mains) {
      auto inst = std::make_unique<Instance>();
      inst->main = std::move(main);
      inst->capacity = cfg_.fixed_batch ? cfg_.fixed_batch : cfg_.max_batch;
      inst->rows = AlignedZeros(inst->capacity * row_bytes_);
      instances_.push_back(std::move(inst));
    }
    for (size_t i = 0; i < instances_.size(); ++i)
      instances_[i]->thread = std::thread([this, i] { Worker(static_cast<int>(i)); });
    std::unique_lock<std::mutex> lock(mu_);
    cond_.wait(lock, [&] { return warmed_ == static_cast<int64_t>(instances_.size()); });
  }

  bool Submit(Rows rows, Done done, bool wake) override {
    Pending item;
    item.rows = std::move(rows);
    item.done = std::move(done);
    return Enqueue(std::move(item), wake);
  }

  // `wake`: false queues it unannounced; the caller's Kick, after a burst, wakes an instance for all of it.
  bool SubmitTicket(int64_t ticket, void* data, int64_t rows, bool wake) {
    Pending item;
    item.rows.data = data;
    item.rows.rows = rows;
    item.ticket = ticket;
    return Enqueue(std::move(item), wake);
  }

  void Kick() override {
    std::lock_guard<std::mutex> lock(mu_);
    WakeOne();
    cond_.notify_all();
  }

  int64_t row_bytes() const override { return row_bytes_; }
  bool checks_finite32() const override {
    return !cfg_.check_input.empty() && cfg_.dtype.code == kDLFloat && cfg_.dtype.bits == 32;
  }
  int64_t output_row_floats() const override { return cfg_.output_row_floats; }
  int64_t fixed_batch() const override { return cfg_.fixed_batch; }

  void Flush() {
    std::lock_guard<std::mutex> lock(mu_);
    flush_ = true;
    WakeAll();
  }

  // Stop taking requests; the instances finish what is queued, then stop. False: not all stopped in
  // `timeout_s` (negative: wait for them).
  bool Close(double timeout_s) {
    std::lock_guard<std::mutex> closing(close_mu_);   // one Close joins the threads
    std::unique_lock<std::mutex> lock(mu_);
    closed_ = true;
    WakeAll();
    auto all_stopped = [&] { return stopped_ == static_cast<int64_t>(instances_.size()); };
    if (timeout_s < 0) {
      cond_.wait(lock, all_stopped);
    } else if (!cond_.wait_for(lock, std::chrono::duration<double>(timeout_s), all_stopped)) {
      return false;
    }
    lock.unlock();
    for (auto& inst : instances_)
      if (inst->thread.joinable()) inst->thread.join();
    for (auto& inst : instances_) inst->main = ffi::Function();   // the VMs (Python's) are released now
    on_batch_ = ffi::Function();
    on_log_ = ffi::Function();
    return true;
  }

  std::vector<double> StatsVector() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<double> out = {stats_.queue_us, stats_.input_us, stats_.infer_us, stats_.output_us,
                               stats_.inference_count, stats_.exec_count};
    out.insert(out.end(), stats_.batch_counts.begin(), stats_.batch_counts.end());
    out.push_back(stats_.batch_sum);
    out.insert(out.end(), stats_.thread_counts.begin(), stats_.thread_counts.end());
    out.push_back(stats_.thread_sum);
    return out;
  }

 private:
  bool Enqueue(Pending item, bool wake = true) {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return false;
    int64_t rows = item.rows.rows;
    queue_.push_back(std::move(item));
    queued_rows_ += rows;
    in_flight_rows_ += rows;
    arrivals_.Submitted(in_flight_rows_);
    if (wake) {
      WakeOne();
      cond_.notify_all();
    }
    return true;
  }

  bool Adaptive() const { return cfg_.threads == 0; }

  void WakeOne() {
    if (idle_.empty() || gathering_) return;
    if (Adaptive() && !idle_.count(0) && !running_.count(0)) return;
    auto first = idle_.begin();
    first->second->notify_one();
    idle_.erase(first);
  }

  void WakeAll() {
    for (auto& entry : idle_) entry.second->notify_one();
    idle_.clear();
    cond_.notify_all();
  }

  void Worker(int index) {
    Instance& inst = *instances_[index];
    // top -H / perf name it: the model's name (up to 10 characters) and the instance (Linux allows 15)
    std::string thread_name = cfg_.name.substr(0, 10) + "/i" + std::to_string(index);
    pthread_setname_np(pthread_self(), thread_name.substr(0, 15).c_str());
    std::vector<int> cores;
    Lanes lanes;
    if (Adaptive()) {   // instance 0's pool gets a thread per core; the others only their share: never wide
      lanes = Lanes::Of(index, static_cast<int>(instances_.size()), cfg_.cores);
      cores = index == 0 ? lanes.wide : lanes.narrow;
      Pin(cores);
    } else if (cfg_.threads > 1 && !cfg_.cores.empty()) {   // TVM would bind every instance to the same cores
      Pin(InstanceCores(index, static_cast<int>(cfg_.threads), cfg_.cores));
    }
    WarmUp(inst);
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++warmed_;
      cond_.notify_all();
    }
    std::vector<Pending> batch;
    int64_t width = 0;
    while (NextBatch(index, &batch, &width)) {
      if (Adaptive() && width != static_cast<int64_t>(cores.size())) {
        cores = width == static_cast<int64_t>(lanes.wide.size()) ? lanes.wide : lanes.narrow;
        Pin(cores);
      }
      RunBatch(inst, &batch, width, index);
      batch.clear();
    }
    std::lock_guard<std::mutex> lock(mu_);
    ++stopped_;
    cond_.notify_all();
  }

  void Pin(const std::vector<int>& cores) {
    try {
      PinThisThreadPool(cores);
    } catch (const std::exception& exc) {
      Log("cannot pin the TVM pool: " + ErrorText(exc));
    }
  }

  // A first run on zeros: memory, this thread's TVM pool; the model is ready when the first request comes.
  void WarmUp(Instance& inst) {
    try {
      Call(inst, inst.rows.get(), cfg_.fixed_batch ? cfg_.fixed_batch : 1, nullptr);
    } catch (const std::exception& exc) {   // real requests will report it
      Log("warm-up run failed: " + ErrorText(exc));
    }
  }

  // Run `rows` rows at `data` (exactly the build's batch for a fixed-batch build); the first `keep` rows'
  // outputs (float32) go to `out` (nullptr: none).
  void Call(Instance& inst, void* data, int64_t rows, float* out, int64_t keep = 0) {
    std::vector<int64_t> shape = {rows};
    shape.insert(shape.end(), cfg_.row_shape.begin(), cfg_.row_shape.end());
    ffi::Tensor input = ffi::Tensor::FromNDAlloc(Borrowed(), ffi::ShapeView(shape.data(), shape.size()), cfg_.dtype,
                                                 DLDevice{kDLCPU, 0}, data);
    ffi::Any result = inst.main(input);
    if (out == nullptr) return;
    ffi::Tensor output;
    if (auto tensor = result.try_cast<ffi::Tensor>()) {
      output = *tensor;
    } else {
      output = result.cast<ffi::Array<ffi::Any>>()[0].cast<ffi::Tensor>();
    }
    CopyOutputs(output, rows, out, keep);
  }

  void CopyOutputs(const ffi::Tensor& output, int64_t rows, float* out, int64_t keep) {
    const DLTensor* t = output.GetDLTensorPtr();
    int64_t count = ffi::GetDataSize(*t) * 8 / std::max(1, t->dtype.bits * t->dtype.lanes);
    if (count != rows * cfg_.output_row_floats)
      throw std::runtime_error("the model's output holds " + std::to_string(count) + " values for " +
                               std::to_string(rows) + " rows, not " + std::to_string(cfg_.output_row_floats) +
                               " per row as mod.json says");
    const uint8_t* src = static_cast<const uint8_t*>(t->data) + t->byte_offset;
    int64_t n = keep * cfg_.output_row_floats;
    if (t->dtype.code == kDLFloat && t->dtype.bits == 32) {
      std::memcpy(out, src, n * sizeof(float));
    } else if ((t->dtype.code == kDLFloat || t->dtype.code == kDLBfloat) && t->dtype.bits == 16) {
      const uint16_t* half = reinterpret_cast<const uint16_t*>(src);
      bool bf16 = t->dtype.code == kDLBfloat;
      for (int64_t i = 0; i < n; ++i) out[i] = bf16 ? Bf16ToFloat(half[i]) : HalfToFloat(half[i]);
    } else {
      throw std::runtime_error("the model's output is " + std::string(ffi::DLDataTypeToString(t->dtype)) +
                               ", not float32, float16 or bfloat16");
    }
  }

  // Instance `index`'s next batch and the TVM threads to run it with (batcher.py _next_batch).
  bool NextBatch(int index, std::vector<Pending>* batch, int64_t* width) {
    std::unique_lock<std::mutex> lock(mu_);
    Instance& inst = *instances_[index];
    auto delay = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(cfg_.max_delay_s));
    while (true) {
      while (queue_.empty()) {
        if (closed_) return false;
        idle_[index] = &inst.wake;
        inst.wake.wait(lock);
        idle_.erase(index);
      }
      Clock::time_point deadline = queue_.front().enqueued + delay;
      int64_t wanted = arrivals_.expected;
      ++gathering_;
      while (!queue_.empty() && queued_rows_ < wanted && !(closed_ || flush_)) {
        if (Clock::now() >= deadline) break;
        cond_.wait_until(lock, deadline);
      }
      --gathering_;
      if (!queue_.empty()) {   // another instance may have taken everything while this one waited
        Take(batch);
        *width = ClaimCores(index, lock);
        running_.insert(index);
        if (!queue_.empty()) WakeOne();   // rows left for the next batch
        return true;
      }
    }
  }

  int64_t ClaimCores(int index, std::unique_lock<std::mutex>& lock) {
    if (!Adaptive()) return cfg_.threads;
    int64_t all = cfg_.cores.size();
    int64_t narrow = std::max<int64_t>(1, all / static_cast<int64_t>(instances_.size()));
    while (true) {
      int64_t width;
      if (index == 0 && busy_cores_ == 0 && queue_.empty()) {
        width = all;
      } else if (busy_cores_ + narrow <= all) {
        width = narrow;
      } else {
        cond_.wait(lock);
        continue;
      }
      busy_cores_ += width;
      return width;
    }
  }

  void Take(std::vector<Pending>* batch) {
    batch->push_back(std::move(queue_.front()));
    queue_.pop_front();
    int64_t rows = batch->front().rows.rows;
    while (!queue_.empty() && rows + queue_.front().rows.rows <= cfg_.max_batch) {
      rows += queue_.front().rows.rows;
      batch->push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    queued_rows_ -= rows;
    arrivals_.Taken();
  }

  // Where each request's rows are staged for the run (the copy into the instance's buffer happens here).
  // Empty: the batch is one request run where it is (in place, or in chunks of a fixed batch).
  std::vector<const uint8_t*> Stage(Instance& inst, std::vector<Pending>& batch, int64_t rows) {
    std::vector<const uint8_t*> at;
    bool whole = batch.size() == 1 && (rows == (cfg_.fixed_batch ? cfg_.fixed_batch : rows)) &&
                 batch[0].rows.data && Aligned(batch[0].rows.data);
    if ((whole || rows > inst.capacity) && !batch[0].rows.fill) {
      at.push_back(static_cast<const uint8_t*>(batch[0].rows.data));
      return at;
    }
    if (rows > inst.capacity) throw std::runtime_error("rows to be filled in exceed the batch buffer");
    uint8_t* dst = inst.rows.get();
    for (Pending& item : batch) {
      if (item.rows.fill) {
        item.rows.finite = item.rows.fill(dst);
      } else {
        std::memcpy(dst, item.rows.data, item.rows.rows * row_bytes_);
      }
      at.push_back(dst);
      dst += item.rows.rows * row_bytes_;
    }
    if (inst.dirty > rows) std::memset(dst, 0, (inst.dirty - rows) * row_bytes_);
    inst.dirty = rows;
    return at;
  }

  // The run of a staged batch: its outputs into inst.out.
  void Infer(Instance& inst, const std::vector<Pending>& batch, const std::vector<const uint8_t*>& at, int64_t rows) {
    inst.out.resize(rows * cfg_.output_row_floats);
    uint8_t* first = const_cast<uint8_t*>(at[0]);
    if (first == inst.rows.get()) {
      Call(inst, first, cfg_.fixed_batch ? cfg_.fixed_batch : rows, inst.out.data(), rows);
    } else if ((cfg_.fixed_batch && rows != cfg_.fixed_batch) || !Aligned(first)) {   // one request above a batch
      RunChunks(inst, first, rows);
    } else {   // one whole batch, in place
      Call(inst, first, rows, inst.out.data(), rows);
    }
  }

  void RunChunks(Instance& inst, uint8_t* data, int64_t rows) {
    if (cfg_.fixed_batch == 0) {   // a build of any batch: all of it at once, from an aligned copy
      Buffer copy = AlignedZeros(rows * row_bytes_);
      std::memcpy(copy.get(), data, rows * row_bytes_);
      Call(inst, copy.get(), rows, inst.out.data(), rows);
      return;
    }
    int64_t step = cfg_.fixed_batch;
    for (int64_t start = 0; start < rows; start += step) {
      int64_t n = std::min(step, rows - start);
      uint8_t* chunk = data + start * row_bytes_;
      float* out = inst.out.data() + start * cfg_.output_row_floats;
      if (n == step && Aligned(chunk)) {
        Call(inst, chunk, step, out, n);
      } else {
        std::memcpy(inst.rows.get(), chunk, n * row_bytes_);
        if (inst.dirty > n) std::memset(inst.rows.get() + n * row_bytes_, 0, (inst.dirty - n) * row_bytes_);
        inst.dirty = n;
        Call(inst, inst.rows.get(), step, out, n);
      }
    }
  }

  // Per request: why its rows, as staged, are refused (empty: they are not).
  std::vector<std::string> Refusals(const std::vector<Pending>& batch, const std::vector<const uint8_t*>& at) {
    std::vector<std::string> refusals(batch.size());
    if (cfg_.check_input.empty()) return refusals;
    for (size_t i = 0; i < batch.size(); ++i) {
      if (batch[i].rows.finite) continue;   // its submitter checked it (finite.h)
      const uint8_t* rows = at.size() == batch.size() ? at[i] : static_cast<const uint8_t*>(batch[i].rows.data);
      auto [bad, first] = NonFinite(rows, batch[i].rows.rows * row_elems_, cfg_.dtype);
      if (bad)
        refusals[i] = "input '" + cfg_.check_input + "' holds " + std::to_string(bad) +
                      " NaN or infinite values (the first at flat index " + std::to_string(first) +
                      "): the model's scores for it would mean nothing; send finite numbers";
    }
    return refusals;
  }

  void RunBatch(Instance& inst, std::vector<Pending>* batch_ptr, int64_t width, int index) {
    std::vector<Pending>& batch = *batch_ptr;
    Clock::time_point start = Clock::now();
    double waited_us = 0;
    int64_t rows = 0;
    for (const Pending& item : batch) {
      waited_us += Micros(item.enqueued, start);
      rows += item.rows.rows;
    }
    std::vector<std::string> refusals;
    std::string failure;
    Clock::time_point started, ran;
    bool all_refused = false;
    try {
      std::vector<const uint8_t*> at = Stage(inst, batch, rows);
      refusals = Refusals(batch, at);
      started = Clock::now();
      all_refused = std::all_of(refusals.begin(), refusals.end(), [](const std::string& r) { return !r.empty(); });
      if (!all_refused) Infer(inst, batch, at, rows);
      ran = Clock::now();
    } catch (const std::exception& exc) {   // each request gets the error
      failure = ErrorText(exc);
      Log("failed on a batch of " + std::to_string(batch.size()) + " requests: " + failure);
    }
    if (!failure.empty() || all_refused) {
      Finished(rows, width, index, [&] { stats_.queue_us += waited_us; });
      HandBack(inst, batch, refusals, failure);
      return;
    }
    Clock::time_point done = Clock::now();
    double n = static_cast<double>(batch.size());
    int64_t answered = 0;   // nv_inference_count: the rows answered (a refused request's rows ran, unused)
    for (size_t i = 0; i < batch.size(); ++i)
      if (refusals.empty() || refusals[i].empty()) answered += batch[i].rows.rows;
    Finished(rows, width, index, [&] {   // counted before the answers go: a client that got one sees it counted
      stats_.queue_us += waited_us;
      stats_.input_us += Micros(start, started) * n;
      stats_.infer_us += Micros(started, ran) * n;
      stats_.output_us += Micros(ran, done) * n;
      stats_.inference_count += answered;
      stats_.exec_count += 1;
      Observe(&stats_.batch_counts, &stats_.batch_sum, rows);
      Observe(&stats_.thread_counts, &stats_.thread_sum, width);
    });
    HandBack(inst, batch, refusals, failure);
  }

  void Observe(std::vector<double>* counts, double* sum, double value) {
    size_t bucket = std::lower_bound(cfg_.bounds.begin(), cfg_.bounds.end(), value) - cfg_.bounds.begin();
    (*counts)[std::min(bucket, counts->size() - 1)] += 1;
    *sum += value;
  }

  // A batch's rows are no longer in flight and its cores are free (batcher.py _done).
  template <typename Count>
  void Finished(int64_t rows, int64_t width, int index, Count count) {
    std::lock_guard<std::mutex> lock(mu_);
    count();
    in_flight_rows_ -= rows;
    running_.erase(index);
    if (Adaptive()) {
      busy_cores_ -= width;
      cond_.notify_all();
    }
  }

  // Each request its outcome: C++ submitters by their Done, Python's by one call of the callback.
  void HandBack(Instance& inst, std::vector<Pending>& batch, const std::vector<std::string>& refusals,
                const std::string& failure) {
    std::vector<int64_t> tickets, statuses;   // status: 0 answered, 1 refused, 2 failed
    ffi::Array<ffi::String> messages;
    std::vector<std::pair<int64_t, int64_t>> spans;   // Python requests' rows in inst.out: offset, count
    int64_t offset = 0, python_rows = 0;
    for (size_t i = 0; i < batch.size(); ++i) {
      Pending& item = batch[i];
      bool refused = !refusals.empty() && !refusals[i].empty();
      const std::string& error = !failure.empty() ? failure : (refused ? refusals[i] : failure);
      if (item.ticket < 0) {
        const float* out = error.empty() ? inst.out.data() + offset * cfg_.output_row_floats : nullptr;
        try {
          item.done(out, item.rows.rows, refused && failure.empty(), error);
        } catch (const std::exception& exc) {
          Log(std::string("a request's Done failed: ") + exc.what());
        }
      } else {
        tickets.push_back(item.ticket);
        statuses.push_back(error.empty() ? 0 : (failure.empty() ? 1 : 2));
        messages.push_back(error);
        if (error.empty()) {
          spans.emplace_back(offset, item.rows.rows);
          python_rows += item.rows.rows;
        }
      }
      offset += item.rows.rows;
    }
    if (tickets.empty()) return;
    int64_t floats = cfg_.output_row_floats;
    ffi::Tensor outputs = ffi::Tensor::FromNDAlloc(AlignedFloats(), {python_rows, floats},
                                                   DLDataType{kDLFloat, 32, 1}, DLDevice{kDLCPU, 0});
    float* dst = static_cast<float*>(outputs.data_ptr());
    for (auto [at, count] : spans) {
      std::memcpy(dst, inst.out.data() + at * floats, count * floats * sizeof(float));
      dst += count * floats;
    }
    try {
      on_batch_(ffi::Shape(tickets), outputs, ffi::Shape(statuses), messages);
    } catch (const std::exception& exc) {   // the callback logs its own errors; this is the FFI's
      Log("the Python hand-back failed: " + ErrorText(exc));
    }
  }

  // Rare events (a failed warm-up or batch) to Python's logging (it takes the GIL); stderr when that fails.
  void Log(const std::string& message) {
    try {
      if (on_log_.defined()) {
        on_log_(message);
        return;
      }
    } catch (const std::exception&) {
    }
    std::fprintf(stderr, "tvmzoo native engine: model %s: %s\n", cfg_.name.c_str(), message.c_str());
  }

  Config cfg_;
  ffi::Function on_batch_, on_log_;
  int64_t row_elems_ = 0, row_bytes_ = 0;
  std::vector<std::unique_ptr<Instance>> instances_;
  std::mutex mu_, close_mu_;
  std::condition_variable cond_;   // waits for a fuller batch, for cores, for warm-up and for the stop
  std::deque<Pending> queue_;
  int64_t queued_rows_ = 0, in_flight_rows_ = 0, busy_cores_ = 0, gathering_ = 0;
  int64_t warmed_ = 0, stopped_ = 0;
  Arrivals arrivals_;
  std::map<int, std::condition_variable*> idle_;   // idle instances by index: a new request wakes the first
  std::set<int> running_;
  bool closed_ = false, flush_ = false;
  Stats stats_;
};

// Engines by handle. Never destroyed (a closed engine stays a valid, refusing Engine for the pump), and the
// table itself is never freed: no static destructor runs at exit while an instance thread might.
std::mutex registry_mu;
std::unordered_map<int64_t, EngineImpl*>& Registry() {
  static auto* engines = new std::unordered_map<int64_t, EngineImpl*>();
  return *engines;
}

EngineImpl* Lookup(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mu);
  auto found = Registry().find(handle);
  if (found == Registry().end()) TVM_FFI_THROW(ValueError) << "no native engine has handle " << handle;
  return found->second;
}

std::vector<int64_t> Ints(const ffi::Shape& shape) { return std::vector<int64_t>(shape.begin(), shape.end()); }

int64_t EngineCreate(ffi::String name, ffi::Array<ffi::Function> mains, ffi::Shape row_shape, ffi::String dtype,
                     int64_t fixed_batch, int64_t max_batch, double max_delay_s, int64_t threads, ffi::Shape cores,
                     ffi::String check_input, int64_t output_row_floats, ffi::Array<double> bounds,
                     ffi::Function on_batch, ffi::Function on_log) {
  if (mains.empty() || max_batch < 1 || output_row_floats < 1)
    TVM_FFI_THROW(ValueError) << "engine_create: needs instances, max_batch >= 1 and output_row_floats >= 1";
  Config cfg{std::string(name), Ints(row_shape), ffi::StringToDLDataType(dtype), fixed_batch, max_batch,
             max_delay_s, threads, {}, std::string(check_input), output_row_floats, {}};
  for (int64_t c : cores) cfg.cores.push_back(static_cast<int>(c));
  for (double b : bounds) cfg.bounds.push_back(b);
  std::vector<ffi::Function> functions(mains.begin(), mains.end());
  auto* engine = new EngineImpl(std::move(cfg), std::move(functions), std::move(on_batch), std::move(on_log));
  std::lock_guard<std::mutex> lock(registry_mu);
  static int64_t next = 1;
  int64_t handle = next++;
  Registry()[handle] = engine;
  return handle;
}

bool EngineSubmit(int64_t handle, int64_t ticket, int64_t data, int64_t rows, bool wake) {
  return Lookup(handle)->SubmitTicket(ticket, reinterpret_cast<void*>(data), rows, wake);
}

void EngineKick(int64_t handle) { Lookup(handle)->Kick(); }

void EngineFlush(int64_t handle) { Lookup(handle)->Flush(); }

bool EngineClose(int64_t handle, double timeout_s) { return Lookup(handle)->Close(timeout_s); }

ffi::Array<double> EngineStats(int64_t handle) {
  ffi::Array<double> out;
  for (double v : Lookup(handle)->StatsVector()) out.push_back(v);
  return out;
}

int64_t EngineRowBytes(int64_t handle) { return Lookup(handle)->row_bytes(); }

}  // namespace

Engine* EngineFromHandle(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mu);
  auto found = Registry().find(handle);
  return found == Registry().end() ? nullptr : found->second;
}

}  // namespace tvmzoo

TVM_FFI_DLL_EXPORT_TYPED_FUNC(engine_create, tvmzoo::EngineCreate);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(engine_submit, tvmzoo::EngineSubmit);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(engine_kick, tvmzoo::EngineKick);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(engine_flush, tvmzoo::EngineFlush);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(engine_close, tvmzoo::EngineClose);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(engine_stats, tvmzoo::EngineStats);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(engine_row_bytes, tvmzoo::EngineRowBytes);
